//! A digest of an exported model, for snapshots and for people: opset, op-type counts,
//! inputs and outputs with their shapes, initializers, metadata keys. No weights.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ngpt_schemas::onnx::{
    tensor_proto::DataType, tensor_shape_proto::dimension, type_proto, ModelProto, ValueInfoProto,
};

fn dtype_name(t: i32) -> String {
    DataType::try_from(t)
        .map(|d| d.as_str_name().to_lowercase())
        .unwrap_or_else(|_| format!("dtype{t}"))
}

fn describe(v: &ValueInfoProto) -> String {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return format!("{} ?", v.name());
    };
    let dims: Vec<String> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(n)) => n.to_string(),
                    Some(dimension::Value::DimParam(p)) => p.clone(),
                    None => "?".into(),
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{} {}[{}]",
        v.name(),
        dtype_name(t.elem_type()),
        dims.join(", ")
    )
}

/// The digest as text. Layers beyond the first are folded into a count, so the digest of
/// a 24-layer model is as short as that of a 2-layer one.
pub fn summary(m: &ModelProto) -> String {
    let mut s = String::new();
    let opsets: Vec<String> = m
        .opset_import
        .iter()
        .map(|o| format!("{}:{}", o.domain(), o.version()))
        .collect();
    let _ = writeln!(
        s,
        "ir_version {}, opset [{}], producer {}",
        m.ir_version(),
        opsets.join(", "),
        m.producer_name()
    );
    let Some(g) = &m.graph else {
        return s;
    };
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &g.node {
        *ops.entry(n.op_type()).or_default() += 1;
    }
    let _ = writeln!(s, "nodes {}:", g.node.len());
    for (op, count) in &ops {
        let _ = writeln!(s, "  {op} {count}");
    }
    let layer_n = |name: &str| {
        name.split('.')
            .nth(1)
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|_| name.starts_with("past_key_values.") || name.starts_with("present."))
    };
    for (label, list) in [("inputs", &g.input), ("outputs", &g.output)] {
        let _ = writeln!(s, "{label}:");
        let more = list
            .iter()
            .filter(|v| layer_n(v.name()).is_some_and(|i| i > 0))
            .count();
        for v in list {
            if layer_n(v.name()).is_some_and(|i| i > 0) {
                continue;
            }
            let _ = writeln!(s, "  {}", describe(v));
        }
        if more > 0 {
            let _ = writeln!(s, "  ... and {more} more of layers 1..");
        }
    }
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in &g.initializer {
        let e = by_type.entry(dtype_name(t.data_type())).or_default();
        e.0 += 1;
        e.1 += t.dims.iter().product::<i64>().max(1) as usize;
    }
    let _ = writeln!(s, "initializers:");
    for (dtype, (count, elems)) in &by_type {
        let _ = writeln!(s, "  {dtype}: {count} tensors, {elems} elements");
    }
    let keys: Vec<&str> = m.metadata_props.iter().map(|p| p.key()).collect();
    let _ = writeln!(s, "metadata: {}", keys.join(", "));
    s
}
