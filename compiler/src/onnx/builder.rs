//! A small ONNX graph builder: unique node names, shared constants, initializers that go
//! into `model.onnx` or to an external data file as they are made (so export streams).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;

use ngpt_schemas::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_proto::DataType,
    AttributeProto, NodeProto, StringStringEntryProto, TensorProto,
};

use ngpt_schemas::prost::Message;

use super::MODEL_FILE;
use crate::error::{Error, Result};

/// Tensors smaller than this stay inline even when the weights go to external data (the
/// threshold `onnx.save_model` uses).
pub const EXTERNAL_MIN_BYTES: usize = 1024;

/// Where large initializers' bytes go.
pub enum Sink<'a> {
    /// To `out`, the external data file named `location`, at aligned offsets; the tensor
    /// records its place in `external_data`.
    External {
        out: &'a mut dyn Write,
        location: String,
        offset: u64,
    },
    /// Straight into `model.onnx` (`out`), each as its own `graph { initializer { ... } }`
    /// record with `raw_data`: protobuf merges repeated occurrences of a message field and
    /// appends repeated fields, so these records and the graph written after them decode as
    /// one graph. The weights are written once, as they are made, and never held together.
    Inline { out: &'a mut dyn Write },
}

/// `v` as a protobuf varint.
pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of `v` as a protobuf varint.
pub fn varint_len(v: u64) -> u64 {
    let mut n = 1;
    let mut v = v >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// The key byte of a length-delimited field (wire type 2) with number `field` (< 16).
pub const fn key(field: u8) -> u8 {
    (field << 3) | 2
}
/// `ModelProto.graph`, `GraphProto.initializer`, `TensorProto.raw_data`.
pub const MODEL_GRAPH: u8 = 7;
pub const GRAPH_INITIALIZER: u8 = 5;
pub const TENSOR_RAW_DATA: u8 = 9;

/// An attribute value.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
}

pub struct Builder<'a> {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    names: HashSet<String>,
    values: HashSet<String>,
    shared: BTreeMap<String, String>,
    sink: Sink<'a>,
    /// Bytes of initializer data written, inline or external.
    pub weight_bytes: u64,
    /// Whether a node of onnxruntime's `com.microsoft` domain was added (the model then
    /// imports that opset).
    pub contrib: bool,
}

fn io_err(location: &str, source: std::io::Error) -> Error {
    Error::Io {
        path: location.into(),
        source,
    }
}

impl<'a> Builder<'a> {
    pub fn new(sink: Sink<'a>) -> Self {
        Builder {
            nodes: vec![],
            initializers: vec![],
            names: HashSet::new(),
            values: HashSet::new(),
            shared: BTreeMap::new(),
            sink,
            weight_bytes: 0,
            contrib: false,
        }
    }

    /// Declares a value name (graph input, node output or initializer); fails on a repeat,
    /// which would make the graph ambiguous.
    pub fn declare(&mut self, value: &str) -> Result<()> {
        if !self.values.insert(value.to_string()) {
            return Err(Error::Argument {
                what: "ONNX export".into(),
                problem: format!("value name `{value}` is defined twice"),
            });
        }
        Ok(())
    }

    fn unique_node_name(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while self.names.contains(&name) || (self.values.contains(&name)) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.names.insert(name.clone());
        name
    }

    /// Adds node `{scope}/{op_type}` (made unique); its one output is named `out`, or the
    /// node's name when `out` is None. Returns the output's name.
    pub fn op(
        &mut self,
        scope: &str,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        out: Option<&str>,
    ) -> Result<String> {
        let name = self.unique_node_name(&format!("{scope}/{op_type}"));
        let output = out.map(str::to_string).unwrap_or_else(|| name.clone());
        self.declare(&output)?;
        let attribute = attrs
            .into_iter()
            .map(|(k, v)| match v {
                Attr::Int(i) => AttributeProto {
                    name: Some(k.into()),
                    r#type: Some(AttributeType::Int as i32),
                    i: Some(i),
                    ..Default::default()
                },
                Attr::Ints(ints) => AttributeProto {
                    name: Some(k.into()),
                    r#type: Some(AttributeType::Ints as i32),
                    ints,
                    ..Default::default()
                },
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: Some(name),
            op_type: Some(op_type.into()),
            domain: None,
            attribute,
            doc_string: None,
        });
        Ok(output)
    }

    /// Adds node `{scope}/{op_type}` of onnxruntime's contrib domain `com.microsoft`, as
    /// [`Builder::op`] does.
    pub fn contrib_op(
        &mut self,
        scope: &str,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        out: Option<&str>,
    ) -> Result<String> {
        let output = self.op(scope, op_type, inputs, attrs, out)?;
        if let Some(n) = self.nodes.last_mut() {
            n.domain = Some(super::CONTRIB_DOMAIN.into());
        }
        self.contrib = true;
        Ok(output)
    }

    /// Adds an initializer from little-endian bytes; those of at least
    /// [`EXTERNAL_MIN_BYTES`] go to the sink.
    pub fn initializer(
        &mut self,
        name: &str,
        dims: &[usize],
        dtype: DataType,
        bytes: Vec<u8>,
        doc: Option<String>,
    ) -> Result<String> {
        self.declare(name)?;
        self.weight_bytes += bytes.len() as u64;
        let mut t = TensorProto {
            name: Some(name.into()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(dtype as i32),
            doc_string: doc,
            ..Default::default()
        };
        if bytes.len() < EXTERNAL_MIN_BYTES {
            t.raw_data = Some(bytes);
            self.initializers.push(t);
            return Ok(name.to_string());
        }
        match &mut self.sink {
            Sink::External {
                out,
                location,
                offset,
            } => {
                // Large tensors start on 64 KiB boundaries (memory-mappable on every OS, as
                // onnx.save_model aligns them), small ones on 64 bytes.
                let align: u64 = if bytes.len() >= 1 << 20 { 1 << 16 } else { 64 };
                let pad = (align - *offset % align) % align;
                out.write_all(&vec![0u8; pad as usize])
                    .map_err(|e| io_err(location, e))?;
                *offset += pad;
                out.write_all(&bytes).map_err(|e| io_err(location, e))?;
                let entry = |k: &str, v: String| StringStringEntryProto {
                    key: Some(k.into()),
                    value: Some(v),
                };
                t.external_data = vec![
                    entry("location", location.clone()),
                    entry("offset", offset.to_string()),
                    entry("length", bytes.len().to_string()),
                ];
                t.set_data_location(DataLocation::External);
                *offset += bytes.len() as u64;
                self.initializers.push(t);
            }
            Sink::Inline { out } => {
                let n = bytes.len() as u64;
                let tensor_len = t.encoded_len() as u64 + 1 + varint_len(n) + n;
                let mut head = vec![key(MODEL_GRAPH)];
                varint(1 + varint_len(tensor_len) + tensor_len, &mut head);
                head.push(key(GRAPH_INITIALIZER));
                varint(tensor_len, &mut head);
                t.encode(&mut head)
                    .map_err(|e| io_err(MODEL_FILE, std::io::Error::other(e)))?;
                head.push(key(TENSOR_RAW_DATA));
                varint(n, &mut head);
                out.write_all(&head)
                    .and_then(|()| out.write_all(&bytes))
                    .map_err(|e| io_err(MODEL_FILE, e))?;
            }
        }
        Ok(name.to_string())
    }

    /// A shared int64 constant (rank 1 with `values`, or rank 0 when `scalar`), made once.
    pub fn i64s(&mut self, values: &[i64], scalar: bool) -> Result<String> {
        assert!(!scalar || values.len() == 1);
        let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let key = if scalar {
            format!("const/i64/{}", list[0])
        } else {
            format!("const/i64/[{}]", list.join(","))
        };
        if let Some(name) = self.shared.get(&key) {
            return Ok(name.clone());
        }
        let dims: Vec<usize> = if scalar { vec![] } else { vec![values.len()] };
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let name = self.initializer(&key, &dims, DataType::Int64, bytes, None)?;
        self.shared.insert(key, name.clone());
        Ok(name)
    }

    /// A shared rank-0 float constant, made once.
    pub fn f32_scalar(&mut self, v: f32) -> Result<String> {
        let key = format!("const/f32/{v:e}");
        if let Some(name) = self.shared.get(&key) {
            return Ok(name.clone());
        }
        let name = self.initializer(&key, &[], DataType::Float, v.to_le_bytes().to_vec(), None)?;
        self.shared.insert(key, name.clone());
        Ok(name)
    }

    /// A shared value computed once (the attention mask, position rows): returns the cached
    /// name for `key`, or records `make`'s result under it.
    pub fn cached(
        &mut self,
        key: &str,
        make: impl FnOnce(&mut Self) -> Result<String>,
    ) -> Result<String> {
        if let Some(name) = self.shared.get(key) {
            return Ok(name.clone());
        }
        let name = make(self)?;
        self.shared.insert(key.to_string(), name.clone());
        Ok(name)
    }
}
