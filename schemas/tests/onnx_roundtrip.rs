//! The generated ONNX types encode a model that decodes back unchanged and that tract loads
//! and runs: a check that the field numbers in `onnx.proto` match the ONNX wire format.
//!
//! Set `NGPT_SCHEMAS_DUMP_ONNX=/some/path.onnx` to also write the tiny model there (for
//! checking it with Python's onnx.checker by hand).

use std::collections::HashMap;

use ngpt_schemas::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, Version,
};
use ngpt_schemas::prost::Message;
use tract_onnx::prelude::*;

const W: [f32; 3] = [0.5, -2.0, 3.0];

fn dim_param(name: &str) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimParam(name.into())),
        denotation: None,
    }
}

fn dim_value(n: i64) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimValue(n)),
        denotation: None,
    }
}

fn float_value(name: &str, dims: Vec<Dimension>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            denotation: None,
        }),
        doc_string: None,
    }
}

fn float_initializer(name: &str, dims: Vec<i64>, values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims,
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// `Y = Mul(X, W)`, X float [batch, 3], W an initializer of the given dims (broadcast).
fn tiny_model(w_dims: Vec<i64>, w: &[f32]) -> ModelProto {
    let graph = GraphProto {
        name: Some("tiny".into()),
        node: vec![NodeProto {
            name: Some("mul".into()),
            op_type: Some("Mul".into()),
            input: vec!["X".into(), "W".into()],
            output: vec!["Y".into()],
            ..Default::default()
        }],
        initializer: vec![float_initializer("W", w_dims, w)],
        input: vec![float_value("X", vec![dim_param("batch"), dim_value(3)])],
        output: vec![float_value("Y", vec![dim_param("batch"), dim_value(3)])],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(Version::IrVersion2021730 as i64),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(18),
        }],
        producer_name: Some("ngpt-schemas-test".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        metadata_props: vec![StringStringEntryProto {
            key: Some("purpose".into()),
            value: Some("roundtrip".into()),
        }],
        ..Default::default()
    }
}

fn input(batch: usize) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..batch * 3).map(|i| i as f32 - 2.5).collect();
    let y = x.iter().enumerate().map(|(i, v)| v * W[i % 3]).collect();
    (x, y)
}

fn run(plan: &Arc<TypedRunnableModel>, batch: usize) -> TractResult<Vec<f32>> {
    let (x, expected) = input(batch);
    let outputs = plan.run(tvec!(Tensor::from_shape(&[batch, 3], &x)?.into_tvalue()))?;
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].shape(), &[batch, 3]);
    let y: Vec<f32> = outputs[0]
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    assert_eq!(y, expected);
    Ok(y)
}

#[test]
fn encode_decode_roundtrip() -> Result<(), ngpt_schemas::prost::DecodeError> {
    let model = tiny_model(vec![3], &W);
    let bytes = model.encode_to_vec();
    let decoded = ModelProto::decode(&bytes[..])?;
    assert_eq!(decoded, model);
    assert_eq!(decoded.encode_to_vec(), bytes);

    // Spot checks of the wire format: field 1 (ir_version, varint) leads, the graph is field 7.
    assert_eq!(&bytes[..2], &[0x08, 8]);
    assert!(bytes.contains(&((7 << 3) | 2)));

    let graph = decoded.graph.as_ref().map(|g| &g.input[0]);
    let dims = graph
        .and_then(|v| v.r#type.as_ref())
        .and_then(|t| match &t.value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            None => None,
        })
        .map(|s| s.dim.clone());
    assert_eq!(dims, Some(vec![dim_param("batch"), dim_value(3)]));
    Ok(())
}

#[test]
fn explicit_presence_keeps_zero_values() -> Result<(), ngpt_schemas::prost::DecodeError> {
    // proto2 presence, as upstream: a zero INT attribute is still on the wire, so the
    // attribute carries exactly one value field, as ONNX writers produce it.
    let attr = AttributeProto {
        name: Some("axis".into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(0),
        ..Default::default()
    };
    let bytes = attr.encode_to_vec();
    assert!(bytes.windows(2).any(|w| w == [3 << 3, 0]), "{bytes:?}");
    let back = AttributeProto::decode(&bytes[..])?;
    assert_eq!(back.i, Some(0));
    assert_eq!(back.r#type(), AttributeType::Int);
    Ok(())
}

#[test]
fn external_data_fields_roundtrip() -> Result<(), ngpt_schemas::prost::DecodeError> {
    use ngpt_schemas::onnx::tensor_proto::DataLocation;
    let entry = |k: &str, v: &str| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    let mut t = TensorProto {
        name: Some("big".into()),
        dims: vec![1024, 1024],
        data_type: Some(DataType::Float16 as i32),
        external_data: vec![
            entry("location", "model.onnx.data"),
            entry("offset", "4096"),
            entry("length", "2097152"),
        ],
        ..Default::default()
    };
    t.set_data_location(DataLocation::External);
    let back = TensorProto::decode(&t.encode_to_vec()[..])?;
    assert_eq!(back, t);
    assert_eq!(back.data_location(), DataLocation::External);
    assert_eq!(back.data_location, Some(1));
    Ok(())
}

#[test]
fn tract_runs_encoded_model() -> TractResult<()> {
    let bytes = tiny_model(vec![3], &W).encode_to_vec();
    if let Ok(path) = std::env::var("NGPT_SCHEMAS_DUMP_ONNX") {
        std::fs::write(path, &bytes)?;
    }

    let model = tract_onnx::onnx().model_for_read(&mut &bytes[..])?;
    let typed = model.into_typed()?;
    assert_eq!(typed.input_outlets()?.len(), 1);
    let batch = typed.sym("batch");
    let x_fact = typed.input_fact(0)?;
    assert_eq!(x_fact.datum_type, f32::datum_type());
    assert_eq!(
        x_fact.shape.to_tvec(),
        tvec![TDim::Sym(batch.clone()), TDim::Val(3)]
    );

    // Symbolic: one plan serves any batch.
    let symbolic = typed.clone().into_optimized()?.into_runnable()?;
    run(&symbolic, 1)?;
    run(&symbolic, 5)?;

    // Concretized: batch fixed to 4 before optimization.
    let concrete = typed.set_symbols(&HashMap::from([(batch, TDim::Val(4))]))?;
    assert_eq!(
        concrete.input_fact(0)?.shape.to_tvec(),
        tvec![TDim::Val(4), TDim::Val(3)]
    );
    let concrete = concrete.into_optimized()?.into_runnable()?;
    run(&concrete, 4)?;
    Ok(())
}

#[test]
fn tract_reads_rank0_initializer() -> TractResult<()> {
    // A scalar is a tensor with no dims and one element.
    let bytes = tiny_model(vec![], &[2.0]).encode_to_vec();
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])?
        .into_optimized()?
        .into_runnable()?;
    let x = [1.0f32, 2.0, 3.0];
    let out = plan.run(tvec!(Tensor::from_shape(&[1, 3], &x)?.into_tvalue()))?;
    let y: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    assert_eq!(y, vec![2.0, 4.0, 6.0]);
    Ok(())
}
