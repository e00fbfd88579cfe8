//! Every validation error of the importer, one test each: a small model from `ngpt init`
//! is corrupted in a temporary directory, and the error must name the file, the key or
//! field, and what was expected. All messages are also kept in one snapshot.

use crate::common;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use common::*;
use ngpt_compiler::import::{self, Format};
use ngpt_compiler::init;

/// Writes the small model (1 layer, 2 heads, n_embd 8, vocab 16) into `dir`.
fn model(dir: &Path) -> Result<PathBuf> {
    init::write(dir, &small_opts())?;
    Ok(dir.to_path_buf())
}

fn set(key: &'static str, value: serde_json::Value) -> impl Fn(&Path) -> Result<PathBuf> {
    move |dir| {
        let dir = model(dir)?;
        edit_config(&dir, |c| {
            c.insert(key.to_string(), value.clone());
        })?;
        Ok(dir)
    }
}

fn remove(key: &'static str) -> impl Fn(&Path) -> Result<PathBuf> {
    move |dir| {
        let dir = model(dir)?;
        edit_config(&dir, |c| {
            c.remove(key);
        })?;
        Ok(dir)
    }
}

fn tensors(edit: fn(&mut Vec<Entry>)) -> impl Fn(&Path) -> Result<PathBuf> {
    move |dir| {
        let dir = model(dir)?;
        edit_tensors(&dir, edit)?;
        Ok(dir)
    }
}

fn entry<'a>(entries: &'a mut [Entry], name: &str) -> &'a mut Entry {
    entries
        .iter_mut()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} in the small model"))
}

/// A minimal pickle (protocol 2) writer: just what `model_args` needs.
enum Py {
    Str(&'static str),
    Int(i32),
    Float(f64),
    Bool(bool),
    Dict(Vec<(&'static str, Py)>),
    List(Vec<Py>),
}

fn pickle_into(v: &Py, out: &mut Vec<u8>) {
    match v {
        Py::Str(s) => {
            out.push(b'X');
            out.extend((s.len() as u32).to_le_bytes());
            out.extend(s.as_bytes());
        }
        Py::Int(i) => {
            out.push(b'J');
            out.extend(i.to_le_bytes());
        }
        Py::Float(f) => {
            out.push(b'G');
            out.extend(f.to_be_bytes());
        }
        Py::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Py::Dict(items) => {
            out.extend(b"}(");
            for (k, v) in items {
                pickle_into(&Py::Str(k), out);
                pickle_into(v, out);
            }
            out.push(b'u');
        }
        Py::List(items) => {
            out.extend(b"](");
            for v in items {
                pickle_into(v, out);
            }
            out.push(b'e');
        }
    }
}

fn pickle(v: &Py) -> Vec<u8> {
    let mut out = vec![0x80, 2];
    pickle_into(v, &mut out);
    out.push(b'.');
    out
}

/// nv-tiny's `model_args`, with `field` replaced when given.
fn model_args(field: Option<(&'static str, Py)>) -> Py {
    let mut args = vec![
        ("use_nGPT", Py::Int(1)),
        ("n_layer", Py::Int(2)),
        ("n_head", Py::Int(2)),
        ("n_embd", Py::Int(64)),
        ("block_size", Py::Int(64)),
        ("base_scale", Py::Float(0.125)),
        ("bias", Py::Bool(false)),
        ("vocab_size", Py::Int(86)),
        ("dropout", Py::Float(0.0)),
    ];
    if let Some((k, v)) = field {
        args.retain(|(name, _)| *name != k);
        args.push((k, v));
    }
    Py::Dict(args)
}

/// Writes a torch-style zip `dir/ckpt.pt` holding `files` (name inside the zip, bytes),
/// padded so the file-size check does not fire first.
fn torch_zip(dir: &Path, files: Vec<(&str, Vec<u8>)>) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("ckpt.pt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path)?);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in files {
        zip.start_file(name, opts)?;
        zip.write_all(&bytes)?;
    }
    zip.start_file("archive/padding", opts)?;
    zip.write_all(&vec![0u8; 400_000])?;
    zip.finish()?;
    Ok(path)
}

fn torch_args(field: Option<(&'static str, Py)>) -> impl Fn(&Path) -> Result<PathBuf> {
    let bytes = pickle(&Py::Dict(vec![("model_args", model_args(field))]));
    move |dir| torch_zip(dir, vec![("archive/data.pkl", bytes.clone())])
}

type Setup = Box<dyn Fn(&Path) -> Result<PathBuf>>;

/// (case name, how to build the bad input, what the message must contain)
fn cases() -> Vec<(&'static str, Setup, Vec<&'static str>)> {
    use serde_json::json;
    vec![
        (
            "missing_key",
            Box::new(tensors(|e| e.retain(|e| e.name != "transformer.h.0.sqk"))),
            vec![
                "model.safetensors",
                "`transformer.h.0.sqk`",
                "missing",
                "[8]",
            ],
        ),
        (
            "wrong_shape",
            Box::new(tensors(|e| {
                entry(e, "transformer.h.0.mlp_c_proj.weight").shape = vec![32, 8]
            })),
            vec![
                "model.safetensors",
                "`transformer.h.0.mlp_c_proj.weight`",
                "[32, 8]",
                "[8, 32]",
            ],
        ),
        (
            "unexpected_key",
            Box::new(tensors(|e| {
                e.push(Entry::f32("transformer.h.1.sqk", &[8], 0.1))
            })),
            vec![
                "model.safetensors",
                "transformer.h.1.sqk",
                "unexpected",
                "n_layer = 1",
            ],
        ),
        (
            "use_ngpt_0",
            Box::new(set("use_nGPT", json!(0))),
            vec![
                "config.json",
                "use_nGPT = 0",
                "not supported",
                "use_nGPT = 1",
            ],
        ),
        (
            "use_ngpt_missing",
            Box::new(remove("use_nGPT")),
            vec!["config.json", "`use_nGPT`", "missing"],
        ),
        (
            "bias_true",
            Box::new(set("bias", json!(true))),
            vec!["config.json", "bias = true", "not supported"],
        ),
        (
            "bias_tensor",
            Box::new(tensors(|e| {
                e.push(Entry::f32("transformer.h.0.query.bias", &[8], 0.0))
            })),
            vec![
                "model.safetensors",
                "`transformer.h.0.query.bias`",
                "not supported",
                "bias",
            ],
        ),
        (
            "n_embd_not_divisible_by_n_head",
            Box::new(set("n_head", json!(3))),
            vec![
                "config.json",
                "`n_embd`",
                "8",
                "not divisible",
                "n_head = 3",
            ],
        ),
        (
            "odd_head_dim",
            Box::new(|dir: &Path| {
                let dir = model(dir)?;
                edit_config(&dir, |c| {
                    c.insert("n_embd".into(), 12.into());
                    c.insert("n_head".into(), 4.into());
                })?;
                Ok(dir)
            }),
            vec!["config.json", "`n_head`", "head_dim", "= 3", "odd", "even"],
        ),
        (
            "zero_dim",
            Box::new(set("n_layer", json!(0))),
            vec!["config.json", "`n_layer`", "positive", "found 0"],
        ),
        (
            "negative_dim",
            Box::new(set("vocab_size", json!(-5))),
            vec!["config.json", "`vocab_size`", "positive", "found -5"],
        ),
        (
            "absurd_dim",
            Box::new(set("n_embd", json!(1u64 << 40))),
            vec!["config.json", "`n_embd`", "at most", "found 1099511627776"],
        ),
        (
            "dims_larger_than_the_file",
            Box::new(set("n_layer", json!(1 << 20))),
            vec![
                "config.json",
                "n_layer",
                "parameters",
                "checkpoint can hold",
            ],
        ),
        (
            "dims_overflow_u64",
            Box::new(|dir: &Path| {
                let dir = model(dir)?;
                edit_config(&dir, |c| {
                    for k in ["n_layer", "n_embd", "vocab_size"] {
                        c.insert(k.into(), (1u64 << 24).into());
                    }
                })?;
                Ok(dir)
            }),
            vec!["config.json", "`n_embd`", "64 bits"],
        ),
        (
            "non_integer_dim",
            Box::new(set("n_layer", json!(2.5))),
            vec!["config.json", "`n_layer`", "expected an integer", "2.5"],
        ),
        (
            "vocab_size_differs_from_embedding_rows",
            Box::new(set("vocab_size", json!(17))),
            vec![
                "model.safetensors",
                "`vocab_size`",
                "17",
                "16 rows",
                "transformer.wte.weight",
            ],
        ),
        (
            "nan_in_tensor",
            Box::new(tensors(|e| {
                let t = entry(e, "transformer.h.0.mlp_alpha");
                t.data[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
            })),
            vec![
                "model.safetensors",
                "`transformer.h.0.mlp_alpha`",
                "NaN",
                "index 3",
            ],
        ),
        (
            "inf_in_bf16_tensor",
            Box::new(|dir: &Path| {
                let mut o = small_opts();
                o.bf16 = true;
                init::write(dir, &o)?;
                edit_tensors(dir, |e| {
                    let t = entry(e, "transformer.h.0.query.weight");
                    assert_eq!(t.dtype, safetensors::Dtype::BF16);
                    t.data[10..12].copy_from_slice(&half::bf16::INFINITY.to_le_bytes());
                })?;
                Ok(dir.to_path_buf())
            }),
            vec![
                "model.safetensors",
                "`transformer.h.0.query.weight`",
                "Inf",
                "index 5",
            ],
        ),
        (
            "unsupported_dtype",
            Box::new(tensors(|e| {
                let t = entry(e, "sz");
                t.dtype = safetensors::Dtype::I64;
                t.data = vec![0; 16 * 8];
            })),
            vec!["model.safetensors", "`sz`", "I64", "F32, BF16 or F16"],
        ),
        (
            "config_not_json",
            Box::new(|dir: &Path| {
                let dir = model(dir)?;
                std::fs::write(dir.join("config.json"), "{ n_layer: 2")?;
                Ok(dir)
            }),
            vec!["config.json", "not valid JSON"],
        ),
        (
            "config_not_an_object",
            Box::new(|dir: &Path| {
                let dir = model(dir)?;
                std::fs::write(dir.join("config.json"), "[1, 2]")?;
                Ok(dir)
            }),
            vec!["config.json", "JSON object"],
        ),
        (
            "config_json_missing",
            Box::new(|dir: &Path| {
                let dir = model(dir)?;
                std::fs::remove_file(dir.join("config.json"))?;
                Ok(dir)
            }),
            vec!["model.safetensors", "no config.json"],
        ),
        (
            "directory_with_neither_file",
            Box::new(|dir: &Path| {
                std::fs::write(dir.join("notes.txt"), "not a checkpoint")?;
                Ok(dir.to_path_buf())
            }),
            vec!["<TMP>", "neither ckpt.pt nor model.safetensors"],
        ),
        (
            "nonexistent_path",
            Box::new(|dir: &Path| Ok(dir.join("no-such-dir/ckpt.pt"))),
            vec!["no-such-dir/ckpt.pt", "No such file"],
        ),
        (
            "missing_base_scale",
            Box::new(remove("base_scale")),
            vec![
                "config.json",
                "`base_scale`",
                "missing",
                "cannot be recovered",
            ],
        ),
        (
            "zero_base_scale",
            Box::new(set("base_scale", json!(0.0))),
            vec!["config.json", "`base_scale`", "finite positive"],
        ),
        (
            "truncated_safetensors",
            Box::new(|dir: &Path| {
                let dir = model(dir)?;
                let path = dir.join("model.safetensors");
                let bytes = std::fs::read(&path)?;
                std::fs::write(&path, &bytes[..bytes.len() - 64])?;
                Ok(dir)
            }),
            vec!["model.safetensors", "not a valid safetensors file"],
        ),
        (
            "torch_file_that_is_not_a_zip",
            Box::new(|dir: &Path| {
                let path = dir.join("ckpt.pt");
                // Starts like a zip (local file header magic), then nothing valid.
                let mut bytes = b"PK\x03\x04".to_vec();
                bytes.extend(std::iter::repeat_n(0x5a, 4096));
                std::fs::write(&path, bytes)?;
                Ok(path)
            }),
            vec!["ckpt.pt", "not a torch checkpoint (zip archive)"],
        ),
        (
            "torch_zip_without_data_pkl",
            Box::new(|dir: &Path| torch_zip(dir, vec![("archive/version", b"3".to_vec())])),
            vec!["ckpt.pt", "no data.pkl"],
        ),
        (
            "torch_pickle_not_a_dict",
            Box::new(|dir: &Path| {
                let bytes = pickle(&Py::List(vec![Py::Int(1)]));
                torch_zip(dir, vec![("archive/data.pkl", bytes)])
            }),
            vec!["ckpt.pt", "not a dict", "train.py"],
        ),
        (
            "torch_pickle_garbage",
            Box::new(|dir: &Path| {
                torch_zip(
                    dir,
                    vec![("archive/data.pkl", b"\x80\x02\xff\xfe".to_vec())],
                )
            }),
            vec!["ckpt.pt", "archive/data.pkl", "cannot parse the pickle"],
        ),
        (
            "torch_without_model_args",
            Box::new(|dir: &Path| {
                let bytes = pickle(&Py::Dict(vec![("iter_num", Py::Int(300))]));
                torch_zip(dir, vec![("archive/data.pkl", bytes)])
            }),
            vec!["ckpt.pt", "no `model_args`"],
        ),
        (
            "torch_use_ngpt_0",
            Box::new(torch_args(Some(("use_nGPT", Py::Int(0))))),
            vec!["ckpt.pt", "use_nGPT = 0", "not supported"],
        ),
        (
            "torch_bias_true",
            Box::new(torch_args(Some(("bias", Py::Bool(true))))),
            vec!["ckpt.pt", "bias = true", "not supported"],
        ),
        (
            "torch_missing_base_scale",
            Box::new(|dir: &Path| {
                let Py::Dict(mut args) = model_args(None) else {
                    unreachable!()
                };
                args.retain(|(k, _)| *k != "base_scale");
                let bytes = pickle(&Py::Dict(vec![("model_args", Py::Dict(args))]));
                torch_zip(dir, vec![("archive/data.pkl", bytes)])
            }),
            vec!["ckpt.pt", "`base_scale`", "missing"],
        ),
        (
            "torch_string_dim",
            Box::new(torch_args(Some(("n_head", Py::Str("2"))))),
            vec!["ckpt.pt", "`n_head`", "expected an integer"],
        ),
        (
            "torch_dims_larger_than_the_file",
            Box::new(torch_args(Some(("n_layer", Py::Int(1 << 20))))),
            vec!["ckpt.pt", "parameters", "checkpoint can hold"],
        ),
        (
            "torch_without_state_dict",
            Box::new(torch_args(None)),
            vec!["ckpt.pt", "`model`"],
        ),
    ]
}

/// Builds case `name` in a fresh temporary directory, loads it, and checks that loading
/// fails with a one-line message holding every expected piece. Returns the message with
/// the temporary directory replaced by `<TMP>`.
fn check(name: &str) -> Result<String> {
    let (_, setup, needles) = cases()
        .into_iter()
        .find(|(n, ..)| *n == name)
        .with_context(|| format!("no case {name}"))?;
    let tmp = tempfile::tempdir()?;
    let path = setup(tmp.path())?;
    let msg = match import::load(&path) {
        Ok(_) => bail!("{name}: import accepted a bad input"),
        Err(e) => e.to_string(),
    };
    let msg = msg.replace(&tmp.path().display().to_string(), "<TMP>");
    assert!(
        !msg.contains('\n'),
        "{name}: message is not one line: {msg}"
    );
    for needle in needles {
        assert!(
            msg.contains(needle),
            "{name}: message lacks {needle:?}: {msg}"
        );
    }
    Ok(msg)
}

macro_rules! case_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() -> Result<()> {
                check(stringify!($name)).map(|_| ())
            }
        )*

        #[test]
        fn every_case_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for (name, ..) in cases() {
                assert!(tested.contains(&name), "case {name} has no #[test]");
            }
        }
    };
}

case_tests!(
    missing_key,
    wrong_shape,
    unexpected_key,
    use_ngpt_0,
    use_ngpt_missing,
    bias_true,
    bias_tensor,
    n_embd_not_divisible_by_n_head,
    odd_head_dim,
    zero_dim,
    negative_dim,
    absurd_dim,
    dims_larger_than_the_file,
    dims_overflow_u64,
    non_integer_dim,
    vocab_size_differs_from_embedding_rows,
    nan_in_tensor,
    inf_in_bf16_tensor,
    unsupported_dtype,
    config_not_json,
    config_not_an_object,
    config_json_missing,
    directory_with_neither_file,
    nonexistent_path,
    missing_base_scale,
    zero_base_scale,
    truncated_safetensors,
    torch_file_that_is_not_a_zip,
    torch_zip_without_data_pkl,
    torch_pickle_not_a_dict,
    torch_pickle_garbage,
    torch_without_model_args,
    torch_use_ngpt_0,
    torch_bias_true,
    torch_missing_base_scale,
    torch_string_dim,
    torch_dims_larger_than_the_file,
    torch_without_state_dict,
);

#[test]
fn all_messages_snapshot() -> Result<()> {
    let mut out = String::new();
    for (name, ..) in cases() {
        out += &format!("{name}:\n  {}\n", check(name)?);
    }
    insta::assert_snapshot!(out);
    Ok(())
}

#[test]
fn the_uncorrupted_small_model_loads() -> Result<()> {
    // The baseline every case starts from must itself be valid, or the cases prove nothing.
    let tmp = tempfile::tempdir()?;
    let ckpt = import::load(&model(tmp.path())?)?;
    assert_eq!(ckpt.format, Format::Safetensors);
    assert_eq!(ckpt.config.n_embd, 8);
    assert!(ckpt.notes.is_empty(), "{:?}", ckpt.notes);
    Ok(())
}

#[test]
fn directory_with_both_files_reads_ckpt_pt_and_notes_it() -> Result<()> {
    // A small safetensors model plus nv-tiny's ckpt.pt in one directory: the config that
    // comes back tells which file was read.
    let tmp = tempfile::tempdir()?;
    let dir = model(tmp.path())?;
    std::fs::copy(nv_tiny().join("ckpt.pt"), dir.join("ckpt.pt"))?;
    let ckpt = import::load(&dir)?;
    assert_eq!(ckpt.format, Format::TorchCkpt);
    assert_eq!(
        ckpt.config.n_embd, 64,
        "read nv-tiny's ckpt.pt, not the n_embd 8 safetensors"
    );
    assert_eq!(ckpt.source, dir.join("ckpt.pt"));
    let note = ckpt
        .notes
        .iter()
        .find(|n| n.contains("both"))
        .context("a note about both files")?;
    assert!(note.contains("ckpt.pt") && note.contains("model.safetensors"));
    assert!(note.contains("reading ckpt.pt"), "{note}");
    Ok(())
}
