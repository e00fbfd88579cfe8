//! Issue 8's corpus of bad inputs, through the binary.
//!
//! Each case is built small by the test (a 1-layer `ngpt init` model, n_embd 8, vocab 16,
//! then corrupted; or that model compiled with `--max-seq-len 8`, then an artifact
//! corrupted), and `ngpt` runs on it. Every case must fail the way the CLI promises:
//! - a non-zero exit that is not a panic (not 101, not a signal), 1 or 2 as expected;
//! - stderr exactly one line, starting `error: `, naming the file, field or argument;
//! - no panic text;
//! - nothing half-written: the output (a file or a directory) does not exist afterwards,
//!   or an existing one is unchanged, and no temporary file is left beside it.
//!
//! All messages are kept in one snapshot (`bad_inputs_corpus__messages.snap`), temporary
//! paths shown as `<TMP>`.
//!
//! Cases already run through the binary elsewhere are not repeated: an unknown path and a
//! file that is not a checkpoint for `logits`, malformed, empty and negative `--tokens`,
//! and a token id = vocab with the reference engine (`tests/cli.rs`); `generate`'s
//! arguments, plan-cuda and the position table of `--engine tract` (`tests/plan_cli.rs`,
//! `tests/onnx_cli.rs`). Checkpoint corruptions covered only through the library in
//! `tests/import_errors.rs` are run here through `ngpt compile`, which also shows that a
//! failed compile writes no directory.

use crate::common;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use common::*;
use ngpt_schemas::plan::Plan;
use ngpt_schemas::prost::Message;

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Building the bad inputs.
// ---------------------------------------------------------------------------------------

/// A safetensors file split into its header (JSON) and its data.
fn st_split(bytes: &[u8]) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let header = header.as_object().context("header is an object")?.clone();
    Ok((header, bytes[8 + n..].to_vec()))
}

fn st_join(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(header)?;
    Ok([&(json.len() as u64).to_le_bytes()[..], &json, data].concat())
}

/// Sets `name`'s `data_offsets` in the header.
fn set_offsets(h: &mut serde_json::Map<String, serde_json::Value>, name: &str, a: u64, b: u64) {
    if let Some(t) = h.get_mut(name).and_then(|t| t.as_object_mut()) {
        t.insert("data_offsets".into(), serde_json::json!([a, b]));
    }
}

fn offsets(h: &serde_json::Map<String, serde_json::Value>, name: &str) -> Result<(u64, u64)> {
    let o = &h[name]["data_offsets"];
    Ok((
        o[0].as_u64().context("offset")?,
        o[1].as_u64().context("offset")?,
    ))
}

/// The small model in a new directory `root/name`.
fn model(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    ngpt_compiler::init::write(&dir, &small_opts())?;
    Ok(dir)
}

/// The small model with its model.safetensors rewritten by `edit` on (header, data).
fn raw_st(
    root: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>, &mut Vec<u8>) -> Result<()>,
) -> Result<PathBuf> {
    let dir = model(root, name)?;
    let path = dir.join("model.safetensors");
    let (mut h, mut data) = st_split(&std::fs::read(&path)?)?;
    edit(&mut h, &mut data)?;
    std::fs::write(&path, st_join(&h, &data)?)?;
    Ok(dir)
}

/// The small model with model.safetensors's bytes replaced by `edit` of them.
fn bytes_st(
    root: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<PathBuf> {
    let dir = model(root, name)?;
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path)?;
    edit(&mut bytes)?;
    std::fs::write(&path, bytes)?;
    Ok(dir)
}

fn tensors_st(root: &Path, name: &str, edit: impl FnOnce(&mut Vec<Entry>)) -> Result<PathBuf> {
    let dir = model(root, name)?;
    edit_tensors(&dir, edit)?;
    Ok(dir)
}

fn config_st(
    root: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<PathBuf> {
    let dir = model(root, name)?;
    edit_config(&dir, edit)?;
    Ok(dir)
}

fn entry_mut<'a>(entries: &'a mut [Entry], name: &str) -> &'a mut Entry {
    entries
        .iter_mut()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} in the small model"))
}

/// A copy of the compiled directory `src` at `root/name` with `file` rewritten by `edit`.
fn artifact(
    root: &Path,
    src: &Path,
    name: &str,
    file: &str,
    edit: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<PathBuf> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    for f in listing(src) {
        std::fs::copy(src.join(&f), dir.join(&f))?;
    }
    let mut bytes = std::fs::read(dir.join(file))?;
    edit(&mut bytes)?;
    std::fs::write(dir.join(file), bytes)?;
    Ok(dir)
}

// ---------------------------------------------------------------------------------------
// The cases.
// ---------------------------------------------------------------------------------------

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Texts the one error line must hold (the file, field or argument).
    needles: Vec<&'static str>,
    /// 1 for errors of ngpt, 2 for arguments the parser refuses.
    exit: i32,
    /// The output this run must not have written (a file or directory), if any.
    out: Option<PathBuf>,
}

fn case(
    name: &'static str,
    args: &[&str],
    needles: &[&'static str],
    exit: i32,
    out: Option<&Path>,
) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
        needles: needles.to_vec(),
        exit,
        out: out.map(Path::to_path_buf),
    }
}

/// `ngpt compile INPUT -o OUT` on a bad checkpoint: OUT must not appear.
fn compile_case(
    name: &'static str,
    input: &Path,
    out_root: &Path,
    needles: &[&'static str],
) -> Case {
    let out = out_root.join(name);
    case(
        name,
        &["compile", utf8(input), "-o", utf8(&out)],
        needles,
        1,
        Some(&out),
    )
}

/// `ngpt logits DIR --engine ENGINE --tokens TOKENS -o OUT.npy`: OUT must not appear.
fn logits_case(
    name: &'static str,
    dir: &Path,
    engine: &str,
    tokens: &str,
    out_root: &Path,
    needles: &[&'static str],
    exit: i32,
) -> Case {
    let out = out_root.join(format!("{name}.npy"));
    case(
        name,
        &[
            "logits",
            utf8(dir),
            "--engine",
            engine,
            "--tokens",
            tokens,
            "-o",
            utf8(&out),
        ],
        needles,
        exit,
        Some(&out),
    )
}

fn cases(tmp: &Path) -> Result<Vec<Case>> {
    use serde_json::json;
    let ck = tmp.join("ckpt");
    let art = tmp.join("art");
    let out = tmp.join("out");
    for d in [&ck, &art, &out] {
        std::fs::create_dir_all(d)?;
    }
    let mut v = vec![];

    // --- Checkpoints, through `ngpt compile`.
    let wrong_magic = bytes_st(&ck, "st_wrong_magic", |b| {
        b[..8].copy_from_slice(b"GIF89a\0\0");
        Ok(())
    })?;
    v.push(compile_case(
        "safetensors: wrong magic (header length from GIF bytes)",
        &wrong_magic,
        &out,
        &["model.safetensors", "not a valid safetensors file"],
    ));
    let past_eof = bytes_st(&ck, "st_past_eof", |b| {
        let len = b.len() as u64;
        b[..8].copy_from_slice(&(len + 100).to_le_bytes());
        Ok(())
    })?;
    v.push(compile_case(
        "safetensors: header length past the end of the file",
        &past_eof,
        &out,
        &["model.safetensors", "not a valid safetensors file"],
    ));
    let absurd = bytes_st(&ck, "st_absurd_header", |b| {
        b[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        Ok(())
    })?;
    v.push(compile_case(
        "safetensors: header length 2^62",
        &absurd,
        &out,
        &["model.safetensors", "not a valid safetensors file"],
    ));
    let overlap = raw_st(&ck, "st_overlap", |h, _| {
        // Into the middle of attn_alpha (not onto its start: the safetensors crate sorts
        // by offset, and a tie would make the name it reports vary run to run).
        let (a, b) = offsets(h, "transformer.h.0.attn_alpha")?;
        set_offsets(h, "transformer.h.0.mlp_alpha", a + 4, b + 4);
        Ok(())
    })?;
    v.push(compile_case(
        "safetensors: two tensors' data offsets overlap",
        &overlap,
        &out,
        &["model.safetensors", "not a valid safetensors file"],
    ));
    let beyond = raw_st(&ck, "st_offsets_beyond", |h, _| {
        // One tensor's span moved past the end of the data.
        let (a, b) = offsets(h, "sz")?;
        set_offsets(h, "sz", a + (1 << 20), b + (1 << 20));
        Ok(())
    })?;
    v.push(compile_case(
        "safetensors: data offsets beyond the data",
        &beyond,
        &out,
        &["model.safetensors", "not a valid safetensors file"],
    ));
    let i64_dtype = tensors_st(&ck, "st_i64", |e| {
        let t = entry_mut(e, "sz");
        t.dtype = safetensors::Dtype::I64;
        t.data = vec![0; 16 * 8];
    })?;
    v.push(compile_case(
        "safetensors: a tensor of dtype I64",
        &i64_dtype,
        &out,
        &["model.safetensors", "`sz`", "I64"],
    ));
    let shape = tensors_st(&ck, "st_shape", |e| {
        let t = entry_mut(e, "transformer.h.0.sqk");
        t.shape = vec![4];
        t.data.truncate(16);
    })?;
    v.push(compile_case(
        "safetensors: a shape that disagrees with the config",
        &shape,
        &out,
        &["`transformer.h.0.sqk`", "[4]", "[8]"],
    ));
    let missing = tensors_st(&ck, "st_missing", |e| e.retain(|t| t.name != "sz"))?;
    v.push(compile_case(
        "safetensors: a missing tensor",
        &missing,
        &out,
        &["`sz`", "missing"],
    ));
    let extra = tensors_st(&ck, "st_extra", |e| {
        e.push(Entry::f32("transformer.h.1.sqk", &[8], 1.0))
    })?;
    v.push(compile_case(
        "safetensors: an extra tensor (a layer beyond n_layer)",
        &extra,
        &out,
        &["transformer.h.1.sqk", "n_layer"],
    ));
    let nan = tensors_st(&ck, "st_nan", |e| {
        entry_mut(e, "sz").data[8..12].copy_from_slice(&f32::NAN.to_le_bytes())
    })?;
    v.push(compile_case(
        "safetensors: NaN",
        &nan,
        &out,
        &["`sz`", "NaN", "index 2"],
    ));
    let inf = tensors_st(&ck, "st_inf", |e| {
        entry_mut(e, "lm_head.weight").data[..4].copy_from_slice(&f32::INFINITY.to_le_bytes())
    })?;
    v.push(compile_case(
        "safetensors: Inf",
        &inf,
        &out,
        &["`lm_head.weight`", "Inf", "index 0"],
    ));
    for (name, dir, key, value, needles) in [
        (
            "config: n_embd 0",
            "cfg_zero",
            "n_embd",
            json!(0),
            &["config.json", "n_embd", "found 0"][..],
        ),
        (
            "config: n_layer -1",
            "cfg_negative",
            "n_layer",
            json!(-1),
            &["config.json", "n_layer", "found -1"][..],
        ),
        (
            "config: n_embd 2^40",
            "cfg_absurd",
            "n_embd",
            json!(1u64 << 40),
            &["config.json", "n_embd", "1099511627776"][..],
        ),
        (
            "config: n_embd 8 not divisible by n_head 3",
            "cfg_divisible",
            "n_head",
            json!(3),
            &["config.json", "n_embd", "n_head", "not divisible"][..],
        ),
        (
            "config: odd head_dim (n_embd 8, n_head 8)",
            "cfg_odd_head",
            "n_head",
            json!(8),
            &["config.json", "head_dim", "odd"][..],
        ),
        (
            "config: bias true",
            "cfg_bias",
            "bias",
            json!(true),
            &["config.json", "bias"][..],
        ),
        (
            "config: use_nGPT 0",
            "cfg_use_ngpt",
            "use_nGPT",
            json!(0),
            &["config.json", "use_nGPT"][..],
        ),
    ] {
        let d = config_st(&ck, dir, |c| {
            c.insert(key.into(), value);
        })?;
        v.push(compile_case(name, &d, &out, needles));
    }
    let not_json = model(&ck, "cfg_not_json")?;
    std::fs::write(not_json.join("config.json"), "{\"n_layer\": 1,")?;
    v.push(compile_case(
        "config: not JSON",
        &not_json,
        &out,
        &["config.json", "not valid JSON"],
    ));
    let neither = ck.join("neither");
    std::fs::create_dir_all(&neither)?;
    std::fs::write(neither.join("notes.txt"), "no checkpoint here")?;
    v.push(compile_case(
        "a directory with neither ckpt.pt nor model.safetensors",
        &neither,
        &out,
        &["neither", "ckpt.pt", "model.safetensors"],
    ));
    v.push(compile_case(
        "a path that does not exist",
        &ck.join("nowhere.pt"),
        &out,
        &["nowhere.pt"],
    ));
    let no_state = ck.join("torch_no_state_dict");
    std::fs::create_dir_all(&no_state)?;
    let config = small_opts().config()?;
    let mut p = Pickle::default();
    p.op(&[0x80, 2])
        .op(b"}(")
        .str("model_args")
        .model_args(&config);
    p.op(b"u.");
    // Padded (a storage no one names), so the config's size check does not fire first.
    let zip = torch_zip_bytes(&p.0, &[vec![0; 8192]])?;
    std::fs::write(no_state.join("ckpt.pt"), zip)?;
    v.push(compile_case(
        "ckpt.pt: a torch zip that holds no state dict",
        &no_state,
        &out,
        &["ckpt.pt", "`model`"],
    ));
    let torch_magic = ck.join("torch_wrong_magic");
    std::fs::create_dir_all(&torch_magic)?;
    std::fs::write(torch_magic.join("ckpt.pt"), b"\x89PNG\r\n\x1a\n not a zip")?;
    v.push(compile_case(
        "ckpt.pt: wrong magic (not a zip)",
        &torch_magic,
        &out,
        &["ckpt.pt", "zip"],
    ));

    // --- Compiled artifacts: the small model compiled with a KV capacity of 8.
    let src = model(tmp, "model")?;
    let compiled = tmp.join("compiled");
    let o = ngpt(&[
        "compile",
        utf8(&src),
        "-o",
        utf8(&compiled),
        "--max-seq-len",
        "8",
    ])?;
    anyhow::ensure!(
        o.status.success(),
        "compile: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let plan_len = std::fs::metadata(compiled.join("model.plan"))?.len() as usize;
    let plan_cut = artifact(&art, &compiled, "plan_truncated", "model.plan", |b| {
        b.truncate(plan_len / 2);
        Ok(())
    })?;
    v.push(logits_case(
        "model.plan truncated to half, --engine plan-cpu",
        &plan_cut,
        "plan-cpu",
        "1,2,3",
        &out,
        &["model.plan", "ngpt plan"],
        1,
    ));
    let plan_flip = artifact(&art, &compiled, "plan_flipped", "model.plan", |b| {
        // The first byte is the tag of format_major (field 1, varint): flipped, it names
        // a field with an invalid wire type.
        b[0] ^= 0xff;
        Ok(())
    })?;
    v.push(logits_case(
        "model.plan with a flipped byte, --engine plan-cpu",
        &plan_flip,
        "plan-cpu",
        "1,2,3",
        &out,
        &["model.plan", "ngpt plan"],
        1,
    ));
    let plan_major = artifact(&art, &compiled, "plan_major", "model.plan", |b| {
        let mut p = Plan::decode(&b[..])?;
        p.format_major += 1;
        *b = p.encode_to_vec();
        Ok(())
    })?;
    v.push(logits_case(
        "model.plan of another format major, --engine plan-cpu",
        &plan_major,
        "plan-cpu",
        "1,2,3",
        &out,
        &["model.plan", "plan format 3", "reads format 2"],
        1,
    ));
    // Kernel text in a plan (what format 1 carried): refused when the plan loads, so by
    // both executors alike, before either compiles or runs anything.
    let plan_code = artifact(&art, &compiled, "plan_code", "model.plan", |b| {
        let mut p = Plan::decode(&b[..])?;
        p.modules[0].source = "extern \"C\" __global__ void embed() { /* not ours */ }".into();
        *b = p.encode_to_vec();
        Ok(())
    })?;
    for (name, engine) in [
        (
            "model.plan carrying kernel source, --engine plan-cpu",
            "plan-cpu",
        ),
        (
            "model.plan carrying kernel source, --engine plan-cuda",
            "plan-cuda",
        ),
    ] {
        v.push(logits_case(
            name,
            &plan_code,
            engine,
            "1,2,3",
            &out,
            &[
                "model.plan",
                "carries",
                "bytes of kernel source",
                "never carries code",
            ],
            1,
        ));
    }
    let onnx_len = std::fs::metadata(compiled.join("model.onnx"))?.len() as usize;
    let onnx_cut = artifact(&art, &compiled, "onnx_truncated", "model.onnx", |b| {
        b.truncate(onnx_len / 2);
        Ok(())
    })?;
    v.push(logits_case(
        "model.onnx truncated to half, --engine tract",
        &onnx_cut,
        "tract",
        "1,2,3",
        &out,
        &["model.onnx"],
        1,
    ));
    let onnx_flip = artifact(&art, &compiled, "onnx_flipped", "model.onnx", |b| {
        // The first byte is the tag of ir_version (field 1, varint).
        b[0] ^= 0xff;
        Ok(())
    })?;
    v.push(logits_case(
        "model.onnx with a flipped byte, --engine tract",
        &onnx_flip,
        "tract",
        "1,2,3",
        &out,
        &["model.onnx"],
        1,
    ));

    // model.weights is mapped, not read: what mapping would report badly.
    let w_len = std::fs::metadata(compiled.join("model.weights"))?.len() as usize;
    let w_cut = artifact(&art, &compiled, "weights_truncated", "model.weights", |b| {
        b.truncate(w_len - 1);
        Ok(())
    })?;
    v.push(logits_case(
        "model.weights one byte short, --engine plan-cpu",
        &w_cut,
        "plan-cpu",
        "1,2,3",
        &out,
        &["model.weights holds", "the plan expects"],
        1,
    ));
    let w_dir = artifact(&art, &compiled, "weights_directory", "model.plan", |_| {
        Ok(())
    })?;
    std::fs::remove_file(w_dir.join("model.weights"))?;
    std::fs::create_dir(w_dir.join("model.weights"))?;
    v.push(logits_case(
        "model.weights a directory, --engine plan-cpu",
        &w_dir,
        "plan-cpu",
        "1,2,3",
        &out,
        &["model.weights", "not a regular file"],
        1,
    ));

    // --- Arguments.
    v.push(logits_case(
        "token id = vocab, --engine plan-cpu",
        &compiled,
        "plan-cpu",
        "1,16",
        &out,
        &["16", "out of range"],
        1,
    ));
    v.push(logits_case(
        "token id = vocab, --engine tract",
        &compiled,
        "tract",
        "1,16",
        &out,
        &["16", "out of range"],
        1,
    ));
    v.push(logits_case(
        "9 tokens into a KV capacity of 8, --engine plan-cpu",
        &compiled,
        "plan-cpu",
        "1,2,3,4,5,6,7,8,9",
        &out,
        &["9 tokens", "KV capacity 8"],
        1,
    ));
    v.push(case(
        "prompt 5 + 4 new tokens into a KV capacity of 8, generate",
        &[
            "generate",
            utf8(&compiled),
            "--tokens",
            "1,2,3,4,5",
            "--max-new-tokens",
            "4",
        ],
        &["KV capacity 8"],
        1,
        None,
    ));
    v.push(case(
        "generate --batch 0",
        &[
            "generate",
            utf8(&compiled),
            "--tokens",
            "1,2",
            "--batch",
            "0",
        ],
        &["--batch 0"],
        1,
        None,
    ));
    v.push(logits_case(
        "unknown engine, logits --engine tpu",
        &compiled,
        "tpu",
        "1,2",
        &out,
        &["tpu", "--engine"],
        2,
    ));
    // Root ignores permission bits, so the unwritable place is one below a regular file.
    let blocker = tmp.join("blocker");
    std::fs::write(&blocker, "a file, not a directory")?;
    let under = blocker.join("out");
    v.push(case(
        "unwritable output directory, compile -o FILE/out",
        &["compile", utf8(&src), "-o", utf8(&under)],
        &["blocker"],
        1,
        Some(&under),
    ));
    let npy = blocker.join("l.npy");
    v.push(case(
        "unwritable output directory, logits -o FILE/l.npy",
        &[
            "logits",
            utf8(&compiled),
            "--engine",
            "plan-cpu",
            "--tokens",
            "1,2",
            "-o",
            utf8(&npy),
        ],
        &["blocker"],
        1,
        Some(&npy),
    ));
    let init_dir = blocker.join("m");
    v.push(case(
        "unwritable output directory, init FILE/m",
        &["init", utf8(&init_dir), "--layers", "1"],
        &["blocker"],
        1,
        Some(&init_dir),
    ));
    v.push(case(
        "existing output directory without --force, compile",
        &["compile", utf8(&src), "-o", utf8(&compiled)],
        &["--out", "compiled", "--force"],
        1,
        Some(&compiled),
    ));
    Ok(v)
}

/// Everything under `path` (a file, or a directory's files with their bytes), to compare
/// before and after a run.
fn snapshot_of(path: &Path) -> Vec<(String, Vec<u8>)> {
    if path.is_file() {
        return vec![(String::new(), std::fs::read(path).unwrap_or_default())];
    }
    listing(path)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(path.join(&f)).unwrap_or_default();
            (f, bytes)
        })
        .collect()
}

#[test]
fn every_bad_input_fails_in_one_line_and_leaves_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cases = cases(tmp.path())?;
    let mut lines = String::new();
    let mut failures = vec![];
    for c in &cases {
        let existed = c.out.as_ref().is_some_and(|o| o.exists());
        let before_out = c.out.as_deref().map(snapshot_of);
        let parent = c
            .out
            .as_ref()
            .and_then(|o| o.parent())
            .map(Path::to_path_buf);
        let before_parent = parent.as_deref().map(listing);
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let o = ngpt(&args)?;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let mut problems = vec![];
        if o.status.code() != Some(c.exit) {
            problems.push(format!(
                "exit {:?} (expected {}; 101 is a panic, none a signal)",
                o.status.code(),
                c.exit
            ));
        }
        if err.contains("panicked") || err.contains("stack backtrace") {
            problems.push("panic text".into());
        }
        let err_lines: Vec<&str> = err.lines().collect();
        if err_lines.len() != 1 || !err.starts_with("error: ") {
            problems.push(format!(
                "{} stderr lines, not one `error:` line",
                err_lines.len()
            ));
        }
        for n in &c.needles {
            if !err.contains(n) {
                problems.push(format!("does not name {n:?}"));
            }
        }
        if let Some(out) = &c.out {
            if existed {
                if before_out.as_ref() != Some(&snapshot_of(out)) {
                    problems.push(format!("changed the existing {}", out.display()));
                }
            } else if out.exists() {
                problems.push(format!("left {} behind", out.display()));
            }
        }
        if let (Some(p), Some(before)) = (&parent, &before_parent) {
            if &listing(p) != before {
                problems.push(format!(
                    "left files beside the output: {:?} -> {:?}",
                    before,
                    listing(p)
                ));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {err}",
                c.name,
                problems.join("; ")
            ));
        }
        lines += &format!("{}: {}\n", c.name, err.trim_end());
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases fail the contract:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    let lines = lines.replace(&tmp.path().display().to_string(), "<TMP>");
    insta::assert_snapshot!("messages", lines);
    Ok(())
}
