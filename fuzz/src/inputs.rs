//! How a fuzz input reaches ngpt's entry points, in one place.
//!
//! The fuzz targets (`fuzz/fuzz_targets/*.rs`, nightly, cargo-fuzz) and the replay test
//! `tests/it/fuzz_regressions.rs` (stable, plain `cargo test`) both include this file, so a
//! committed input means the same thing to both. Each decoder has an encoder beside it, used
//! to write the seed corpora.
//!
//! Input layouts:
//! - import_safetensors: `[mode]` then, for even modes, the bytes of `model.safetensors`
//!   (with the fixed `config.json` of [`small_config_json`]); for odd modes,
//!   `[config length: u16 LE][config.json][model.safetensors]`.
//! - import_torch: `[mode]` then, for even modes, the bytes of `ckpt.pt`; for odd modes,
//!   `[pickle length: u32 LE][archive/data.pkl]` followed by storages, each
//!   `[length: u32 LE][bytes]` (the last may be short), stored as `archive/data/0`, `1`, ...
//!   in a zip this module writes (so the fuzzer reaches the pickle and the tensor data
//!   without having to forge zip checksums).
//! - plan: `[plan length: u32 LE][model.plan][model.weights]`.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use ngpt_compiler::import::{self, Checkpoint};
use ngpt_compiler::init::InitOptions;

/// A scratch directory for one fuzz process, `fuzz/target/scratch/<name>-<pid>` (ignored
/// by git; libFuzzer exits without running destructors, so `rm -rf fuzz/target/scratch`
/// after a run).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/scratch")
        .join(format!("{name}-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// The model every seed comes from: 1 layer, 2 heads, n_embd 8, vocab 16, block 16.
pub fn small_opts(bf16: bool) -> InitOptions {
    InitOptions {
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        vocab_size: 16,
        block_size: 16,
        seed: 7,
        base_scale: None,
        bf16,
    }
}

/// The fixed `config.json` of the even safetensors modes (the small model's).
pub fn small_config_json() -> String {
    match small_opts(false).config() {
        Ok(c) => c.to_json(),
        Err(e) => format!("{{\"error\": \"{e}\"}}"),
    }
}

/// Splits `len` bytes off the front, after a little-endian length of `N` bytes; a length
/// past the end takes what there is.
fn take_prefixed<const N: usize>(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < N {
        return (data, &[]);
    }
    let mut len = [0u8; 8];
    len[..N].copy_from_slice(&data[..N]);
    let len = (u64::from_le_bytes(len) as usize).min(data.len() - N);
    data[N..].split_at(len)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> ngpt_compiler::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|source| ngpt_compiler::Error::Io { path, source })
}

/// Writes the input into `dir` as `model.safetensors` + `config.json` and imports `dir`.
pub fn import_safetensors(data: &[u8], dir: &Path) -> ngpt_compiler::Result<Checkpoint> {
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let (config, st) = if mode % 2 == 0 {
        (small_config_json().into_bytes(), rest)
    } else {
        let (config, st) = take_prefixed::<2>(rest);
        (config.to_vec(), st)
    };
    write(dir, "config.json", &config)?;
    write(dir, "model.safetensors", st)?;
    import::load(dir)
}

/// An import_safetensors input: the fixed config (`None`) or this config.json.
pub fn encode_safetensors(config: Option<&[u8]>, st: &[u8]) -> Vec<u8> {
    match config {
        None => [&[0u8][..], st].concat(),
        Some(c) => {
            let len = u16::try_from(c.len()).unwrap_or(u16::MAX);
            [&[1u8][..], &len.to_le_bytes(), &c[..len as usize], st].concat()
        }
    }
}

/// A torch zip (`archive/data.pkl` and `archive/data/{i}`), stored uncompressed.
pub fn torch_zip(pickle: &[u8], storages: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts)?;
    zip.write_all(pickle)?;
    for (i, s) in storages.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts)?;
        zip.write_all(s)?;
    }
    Ok(zip.finish()?.into_inner())
}

/// Writes the input into `dir` as `ckpt.pt` and imports it.
pub fn import_torch(data: &[u8], dir: &Path) -> ngpt_compiler::Result<Checkpoint> {
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let path = dir.join("ckpt.pt");
    if mode % 2 == 0 {
        write(dir, "ckpt.pt", rest)?;
    } else {
        let (pickle, mut rest) = take_prefixed::<4>(rest);
        let mut storages = vec![];
        while !rest.is_empty() {
            let (s, r) = take_prefixed::<4>(rest);
            storages.push(s);
            rest = r;
        }
        let zip = torch_zip(pickle, &storages).map_err(|source| ngpt_compiler::Error::Io {
            path: path.clone(),
            source,
        })?;
        write(dir, "ckpt.pt", &zip)?;
    }
    import::load(&path)
}

/// An import_torch input holding a whole `ckpt.pt`.
pub fn encode_torch_file(ckpt: &[u8]) -> Vec<u8> {
    [&[0u8][..], ckpt].concat()
}

/// An import_torch input holding a pickle and its storages.
pub fn encode_torch_parts(pickle: &[u8], storages: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![1u8];
    for part in std::iter::once(pickle).chain(storages.iter().copied()) {
        out.extend((part.len() as u32).to_le_bytes());
        out.extend(part);
    }
    out
}

/// A plan input.
pub fn encode_plan(plan: &[u8], weights: &[u8]) -> Vec<u8> {
    [&(plan.len() as u32).to_le_bytes()[..], plan, weights].concat()
}

/// What became of a plan input.
#[derive(Debug)]
pub enum PlanOutcome {
    LoadErr(String),
    RunErr(String),
    Ran,
    /// A broken contract, which the fuzz target turns into a crash: the run returned
    /// logits of the wrong size (callers slice rows by vocab), or loading the weights in
    /// place (as a mapped `model.weights` is) and loading a copy disagreed.
    Broken(String),
}

/// Loads the plan twice, from a copy of the weights and with the weights viewed in place
/// (`from_vec`, the way a mapped `model.weights` is read), which must agree; if it loads,
/// lists it and runs a ragged batch of two through prefill and two decode steps (as
/// `tests/it/plan_cli.rs` does).
pub fn plan(data: &[u8]) -> PlanOutcome {
    use ngpt_runtime::listing::{listing, Shape};
    use ngpt_runtime::plan::LoadedPlan;
    use ngpt_runtime::session::Session;
    let (plan, weights) = take_prefixed::<4>(data);
    let copied = LoadedPlan::from_bytes(plan, weights, "model.plan");
    let in_place = LoadedPlan::from_vec(plan, weights.to_vec(), "model.plan");
    let p = match (copied, in_place) {
        (Ok(a), Ok(b)) if a.weights() == b.weights() => Arc::new(b),
        (Err(a), Err(b)) if a.to_string() == b.to_string() => {
            return PlanOutcome::LoadErr(a.to_string())
        }
        (a, b) => {
            let say = |r: &ngpt_runtime::Result<LoadedPlan>| match r {
                Ok(_) => "loaded".to_string(),
                Err(e) => e.to_string(),
            };
            return PlanOutcome::Broken(format!(
                "a copy and the weights in place load differently: {} / {}",
                say(&a),
                say(&b)
            ));
        }
    };
    let _ = listing(
        &p,
        Shape {
            batch: 2,
            tokens: 5,
            context: 6,
        },
    );
    let run = || -> ngpt_runtime::Result<Option<String>> {
        let mut s = Session::new(Arc::clone(&p), 2)?;
        let v = s.vocab();
        let logits = s.prefill(&[vec![1, 2, 3, 4, 5], vec![6, 7, 8]])?;
        if logits.len() != 2 * 5 * v {
            return Ok(Some(format!(
                "prefill returned {} logits, not 2 x 5 x {v}",
                logits.len()
            )));
        }
        for next in [[9, 10], [11, 12]] {
            let logits = s.decode(&next)?;
            if logits.len() != 2 * v {
                return Ok(Some(format!(
                    "decode returned {} logits, not 2 x {v}",
                    logits.len()
                )));
            }
        }
        Ok(None)
    };
    match run() {
        Ok(None) => PlanOutcome::Ran,
        Ok(Some(bad)) => PlanOutcome::Broken(bad),
        Err(e) => PlanOutcome::RunErr(e.to_string()),
    }
}
