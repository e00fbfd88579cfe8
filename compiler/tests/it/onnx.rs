//! ONNX export, checked by running the exported model with tract: parity with the literal
//! reference on every model, the KV cache (prefill, chunk, token by token), a ragged
//! left-padded batch, f16 weights, external data, metadata, determinism, every pass prefix,
//! and a snapshot of the model's digest.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use candle_core::DType;
use ngpt_compiler::compare::{compare, Comparison};
use ngpt_compiler::compile::{self, Compiled};
use ngpt_compiler::import::{self, Checkpoint};
use ngpt_compiler::init::{self, InitOptions, Preset};
use ngpt_compiler::onnx::{self, summary::summary, tract::Session, Options, WeightDtype};
use ngpt_compiler::passes;
use ngpt_compiler::reference::{self, Precision};
use ngpt_schemas::onnx::{tensor_proto::DataLocation, ModelProto};
use ngpt_schemas::prost::Message;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nv-tiny")
}

fn generated(opts: InitOptions) -> Result<(tempfile::TempDir, Checkpoint)> {
    let dir = tempfile::tempdir()?;
    init::write(dir.path(), &opts)?;
    let ckpt = import::load(dir.path())?;
    Ok((dir, ckpt))
}

struct Model {
    label: &'static str,
    _dir: Option<tempfile::TempDir>,
    ckpt: Checkpoint,
}

/// nv-tiny (trained by NVIDIA's code) and `ngpt init` models: perturbed scales; base_scale
/// 1/32 with n_embd 128 and BF16 blocks; odd shapes (n_embd 96, 3 heads, vocab 211).
fn models() -> Result<Vec<Model>> {
    let mut out = vec![Model {
        label: "nv-tiny",
        _dir: None,
        ckpt: import::load(&fixture())?,
    }];
    let mut tiny = InitOptions::preset(Preset::Tiny);
    tiny.seed = 3;
    let mut bs = InitOptions::preset(Preset::Tiny);
    bs.n_embd = 128;
    bs.n_head = 4;
    bs.base_scale = Some(1.0 / 32.0);
    bs.bf16 = true;
    let mut odd = InitOptions::preset(Preset::Tiny);
    odd.n_layer = 3;
    odd.n_head = 3;
    odd.n_embd = 96;
    odd.vocab_size = 211;
    for (label, o) in [("tiny", tiny), ("bs1/32-bf16", bs), ("odd", odd)] {
        let (d, ckpt) = generated(o)?;
        out.push(Model {
            label,
            _dir: Some(d),
            ckpt,
        });
    }
    Ok(out)
}

fn nv_tiny() -> Result<Model> {
    Ok(models()?.remove(0))
}

/// A prompt for the model: nv-tiny's own, or 24 deterministic ids.
fn prompt(m: &Model) -> Result<Vec<u32>> {
    if m.label == "nv-tiny" {
        let text = std::fs::read_to_string(fixture().join("prompt.json"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        return Ok(v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect());
    }
    let v = m.ckpt.config.vocab_size as u64;
    Ok((0..24u64).map(|i| ((i * 7919 + 13) % v) as u32).collect())
}

fn reference(ckpt: &Checkpoint, tokens: &[u32]) -> Result<Vec<f64>> {
    Ok(reference::logits(ckpt, tokens, Precision::F64)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn compiled(ckpt: &Checkpoint) -> Result<Compiled> {
    Ok(compile::compile(ckpt, &compile::Options::default())?)
}

fn export(ckpt: &Checkpoint, c: &Compiled, opts: &Options) -> Result<onnx::Exported> {
    let info = onnx::ModelInfo::new(ckpt, &c.records)?;
    Ok(onnx::export(&c.graph, &info, opts)?)
}

fn session(ckpt: &Checkpoint, opts: &Options) -> Result<Session> {
    let c = compiled(ckpt)?;
    let e = export(ckpt, &c, opts)?;
    Ok(Session::from_bytes(&e.model)?)
}

fn check(label: &str, c: Comparison, tol: f64, top1: f64) -> Result<()> {
    println!(
        "{label:<28} rel err {:.2e}, top-1 {}/{}",
        c.rel_err, c.top1_agree, c.positions
    );
    // tract runs f32 activations; one model's weights are exported as f16.
    let weights = if label.ends_with(" f16") {
        "f16"
    } else {
        "f32"
    };
    crate::baseline::assert_within_baseline(
        &format!("onnx/{label}/tract/{weights}"),
        c.rel_err,
        tol,
    );
    ensure!(
        c.passes(tol, top1),
        "{label}: {c:?} (tol {tol}, top-1 {top1})"
    );
    Ok(())
}

#[test]
fn tract_matches_the_reference_on_every_model() -> Result<()> {
    for m in models()? {
        let s = session(&m.ckpt, &Options::for_config(&m.ckpt.config))?;
        assert_eq!(s.layers, m.ckpt.config.n_layer);
        assert_eq!(s.heads, m.ckpt.config.n_head);
        assert_eq!(s.vocab, m.ckpt.config.vocab_size);
        let tokens = prompt(&m)?;
        let got = s.logits(&tokens)?;
        let want = reference(&m.ckpt, &tokens)?;
        check(
            &format!("{} f32", m.label),
            compare(&f64s(&got), &want, s.vocab),
            1e-5,
            1.0,
        )?;
    }
    Ok(())
}

#[test]
fn nv_tiny_matches_nvidia_float64_logits() -> Result<()> {
    let m = nv_tiny()?;
    let s = session(&m.ckpt, &Options::for_config(&m.ckpt.config))?;
    let got = s.logits(&prompt(&m)?)?;
    let nv = candle_core::Tensor::read_npy(fixture().join("nv_logits_f64.npy"))?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    check(
        "nv-tiny vs NVIDIA f64",
        compare(&f64s(&got), &nv, s.vocab),
        1e-5,
        1.0,
    )
}

/// Prefill 5 tokens, then a chunk of 4 against the filled cache, then one token at a
/// time, each call feeding `present` back as `past`: every position's logits equal the
/// full-sequence reference.
#[test]
fn kv_cache_prefill_chunk_and_decode_equal_the_full_sequence() -> Result<()> {
    for m in models()? {
        let s = session(&m.ckpt, &Options::for_config(&m.ckpt.config))?;
        let tokens = prompt(&m)?;
        let mut cache = s.empty_cache(1);
        let mut logits = vec![];
        let mut at = 0;
        for len in [5usize, 4].into_iter().chain(std::iter::repeat(1)) {
            if at >= tokens.len() {
                break;
            }
            let len = len.min(tokens.len() - at);
            let ids: Vec<i64> = tokens[at..at + len].iter().map(|&t| t as i64).collect();
            let pos: Vec<i64> = (at as i64..(at + len) as i64).collect();
            let mask = vec![1i64; at + len];
            let step = s.run(&ids, &mask, &pos, &cache)?;
            assert_eq!(step.sequence, len);
            assert_eq!(step.cache.len, at + len);
            logits.extend(step.logits);
            cache = step.cache;
            at += len;
        }
        let want = reference(&m.ckpt, &tokens)?;
        check(
            &format!("{} kv decode", m.label),
            compare(&f64s(&logits), &want, s.vocab),
            1e-5,
            1.0,
        )?;
    }
    Ok(())
}

/// A batch of two rows of different lengths, the shorter one left-padded and masked by
/// attention_mask; then three decode steps for both rows. Each row's logits equal the
/// reference of its own unpadded sequence, and padding rows hold no NaN.
#[test]
fn ragged_left_padded_batch_matches_each_row() -> Result<()> {
    for m in models()? {
        let s = session(&m.ckpt, &Options::for_config(&m.ckpt.config))?;
        let all = prompt(&m)?;
        let (long, pad) = (all.len() - 3, 5usize);
        let a: Vec<u32> = all[..long].to_vec();
        let b: Vec<u32> = all[3..3 + long - pad].iter().rev().copied().collect();
        let mut ids: Vec<i64> = a.iter().map(|&t| t as i64).collect();
        ids.extend(std::iter::repeat_n(0, pad));
        ids.extend(b.iter().map(|&t| t as i64));
        let mut mask = vec![1i64; long];
        mask.extend(std::iter::repeat_n(0, pad));
        mask.extend(std::iter::repeat_n(1, long - pad));
        let mut pos: Vec<i64> = (0..long as i64).collect();
        pos.extend(std::iter::repeat_n(0, pad));
        pos.extend(0..(long - pad) as i64);
        let step = s.run(&ids, &mask, &pos, &s.empty_cache(2))?;
        ensure!(
            step.logits.iter().all(|v| v.is_finite()),
            "{}: NaN or Inf in a padded batch",
            m.label
        );
        let v = s.vocab;
        let row = |r: usize, from: usize, to: usize| -> Vec<f64> {
            f64s(&step.logits[(r * long + from) * v..(r * long + to) * v])
        };
        let (mut a_logits, mut b_logits) = (row(0, 0, long), row(1, pad, long));
        let (mut a_seq, mut b_seq) = (a.clone(), b.clone());
        let mut cache = step.cache;
        for i in 0..3 {
            let (ta, tb) = (all[(i * 5) % all.len()], all[(i * 3 + 1) % all.len()]);
            a_seq.push(ta);
            b_seq.push(tb);
            let ids = [ta as i64, tb as i64];
            let pos = [(a_seq.len() - 1) as i64, (b_seq.len() - 1) as i64];
            let mut next = vec![];
            for r in 0..2 {
                let w = cache.len;
                next.extend_from_slice(&mask[r * w..(r + 1) * w]);
                next.push(1);
            }
            mask = next;
            let step = s.run(&ids, &mask, &pos, &cache)?;
            a_logits.extend(f64s(&step.logits[..v]));
            b_logits.extend(f64s(&step.logits[v..]));
            cache = step.cache;
        }
        check(
            &format!("{} ragged row 0", m.label),
            compare(&a_logits, &reference(&m.ckpt, &a_seq)?, v),
            1e-5,
            1.0,
        )?;
        check(
            &format!("{} ragged row 1 (padded)", m.label),
            compare(&b_logits, &reference(&m.ckpt, &b_seq)?, v),
            1e-5,
            1.0,
        )?;
    }
    Ok(())
}

#[test]
fn f16_weights_stay_within_1e_2_and_halve_the_size() -> Result<()> {
    for m in models()? {
        let c = compiled(&m.ckpt)?;
        let mut opts = Options::for_config(&m.ckpt.config);
        let f32_size = export(&m.ckpt, &c, &opts)?.model.len();
        opts.weights = WeightDtype::F16;
        let e = export(&m.ckpt, &c, &opts)?;
        let s = Session::from_bytes(&e.model)?;
        let tokens = prompt(&m)?;
        let got = s.logits(&tokens)?;
        check(
            &format!("{} f16", m.label),
            compare(&f64s(&got), &reference(&m.ckpt, &tokens)?, s.vocab),
            1e-2,
            0.95,
        )?;
        // Weights halve; the f32 position table (max_seq_len x head_dim) stays.
        let table = 4 * onnx::default_max_seq_len(&m.ckpt.config) * m.ckpt.config.head_dim();
        let weights_f32 = f32_size - table;
        println!(
            "{}: f32 {} bytes, f16 {} bytes",
            m.label,
            f32_size,
            e.model.len()
        );
        ensure!(e.model.len() - table < weights_f32 * 6 / 10);
    }
    Ok(())
}

#[test]
fn external_data_round_trips_through_tract() -> Result<()> {
    let m = nv_tiny()?;
    let c = compiled(&m.ckpt)?;
    let info = onnx::ModelInfo::new(&m.ckpt, &c.records)?;
    let mut opts = Options::for_config(&m.ckpt.config);
    opts.external_data = true;
    let dir = tempfile::tempdir()?;
    let w = onnx::write(&c.graph, &info, &opts, dir.path())?;
    assert_eq!(w.files, ["model.onnx", "model.onnx.data"]);
    let data_len = std::fs::metadata(dir.path().join("model.onnx.data"))?.len();
    assert_eq!(w.data_bytes, data_len);
    let model = ModelProto::decode(&std::fs::read(dir.path().join("model.onnx"))?[..])?;
    let g = model.graph.as_ref().unwrap();
    let mut external = 0;
    for t in &g.initializer {
        if t.data_location() != DataLocation::External {
            assert!(
                t.raw_data.as_ref().is_some_and(|d| d.len() < 1024),
                "{}",
                t.name()
            );
            continue;
        }
        external += 1;
        assert!(t.raw_data.is_none());
        let get = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key() == k)
                .map(|e| e.value().to_string())
        };
        assert_eq!(get("location").as_deref(), Some("model.onnx.data"));
        let offset: u64 = get("offset").unwrap().parse()?;
        let length: u64 = get("length").unwrap().parse()?;
        assert_eq!(offset % 64, 0);
        assert!(offset + length <= data_len);
    }
    assert!(external >= 9, "only {external} tensors went external");
    assert!(w.model_bytes < 64 << 10, "model.onnx holds the weights");
    // The same bytes as the in-memory export.
    let mem = onnx::export(&c.graph, &info, &opts)?;
    assert_eq!(mem.model, std::fs::read(dir.path().join("model.onnx"))?);
    assert_eq!(
        mem.data.unwrap(),
        std::fs::read(dir.path().join("model.onnx.data"))?
    );

    let s = Session::load(&dir.path().join("model.onnx"))?;
    let tokens = prompt(&m)?;
    check(
        "nv-tiny external data",
        compare(
            &f64s(&s.logits(&tokens)?),
            &reference(&m.ckpt, &tokens)?,
            s.vocab,
        ),
        1e-5,
        1.0,
    )
}

/// A graph's initializers sorted by name.
fn by_name(g: &ngpt_schemas::onnx::GraphProto) -> Vec<&ngpt_schemas::onnx::TensorProto> {
    let mut v: Vec<_> = g.initializer.iter().collect();
    v.sort_by(|a, b| a.name().cmp(b.name()));
    v
}

/// An inline model.onnx is written in one pass: each large initializer is its own
/// `graph { initializer }` record written as it is made, the rest of the graph after them.
/// Protobuf merges the records into one graph: prost decodes every initializer inline, in
/// the same order and with the same bytes as the external-data export's tensors, and tract
/// runs it at parity. (CI also runs onnx.checker and onnxruntime on such a file.)
#[test]
fn inline_model_is_written_in_one_pass_and_decodes_as_one_graph() -> Result<()> {
    let m = nv_tiny()?;
    let c = compiled(&m.ckpt)?;
    let info = onnx::ModelInfo::new(&m.ckpt, &c.records)?;
    let opts = Options::for_config(&m.ckpt.config);
    let dir = tempfile::tempdir()?;
    let w = onnx::write(&c.graph, &info, &opts, dir.path())?;
    assert_eq!(w.files, ["model.onnx"]);
    let bytes = std::fs::read(dir.path().join("model.onnx"))?;
    assert_eq!(w.model_bytes, bytes.len() as u64);
    assert_eq!(onnx::export(&c.graph, &info, &opts)?.model, bytes);
    let names: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    assert_eq!(names, ["model.onnx"], "a staging file was left behind");

    let inline = ModelProto::decode(&bytes[..])?;
    let mut ext_opts = opts.clone();
    ext_opts.external_data = true;
    let ext = onnx::export(&c.graph, &info, &ext_opts)?;
    let ext_model = ModelProto::decode(&ext.model[..])?;
    let data = ext.data.unwrap();
    let (gi, ge) = (
        inline.graph.as_ref().unwrap(),
        ext_model.graph.as_ref().unwrap(),
    );
    assert_eq!(gi.node, ge.node);
    assert_eq!(gi.input, ge.input);
    assert_eq!(gi.output, ge.output);
    let (ti, te) = (by_name(gi), by_name(ge));
    assert_eq!(ti.len(), te.len());
    let mut large = 0;
    for (a, b) in ti.iter().zip(&te) {
        assert_eq!(
            (a.name(), &a.dims, a.data_type),
            (b.name(), &b.dims, b.data_type)
        );
        assert_ne!(a.data_location(), DataLocation::External, "{}", a.name());
        let want: &[u8] = if b.data_location() == DataLocation::External {
            large += 1;
            let get = |k: &str| -> Result<usize> {
                let e = b.external_data.iter().find(|e| e.key() == k);
                Ok(e.map(|e| e.value()).unwrap_or_default().parse()?)
            };
            let (offset, length) = (get("offset")?, get("length")?);
            &data[offset..offset + length]
        } else {
            b.raw_data()
        };
        assert_eq!(a.raw_data(), want, "{}", a.name());
    }
    assert!(large >= 9, "only {large} large tensors");

    let s = Session::load(&dir.path().join("model.onnx"))?;
    let tokens = prompt(&m)?;
    check(
        "nv-tiny inline, one pass",
        compare(
            &f64s(&s.logits(&tokens)?),
            &reference(&m.ckpt, &tokens)?,
            s.vocab,
        ),
        1e-5,
        1.0,
    )
}

#[test]
fn metadata_says_where_the_model_came_from() -> Result<()> {
    let m = nv_tiny()?;
    let c = compiled(&m.ckpt)?;
    let e = export(&m.ckpt, &c, &Options::for_config(&m.ckpt.config))?;
    let model = ModelProto::decode(&e.model[..])?;
    assert_eq!(model.ir_version(), 8);
    assert_eq!(model.opset_import.len(), 1);
    assert_eq!(model.opset_import[0].domain(), "");
    assert_eq!(model.opset_import[0].version(), 18);
    assert_eq!(model.producer_name(), "ngpt");
    let get = |k: &str| {
        model
            .metadata_props
            .iter()
            .find(|p| p.key() == k)
            .map(|p| p.value().to_string())
            .unwrap_or_else(|| panic!("metadata `{k}` missing"))
    };
    let args: serde_json::Value = serde_json::from_str(&get("model_args"))?;
    assert_eq!(args["n_layer"], 2);
    assert_eq!(args["n_embd"], 64);
    assert_eq!(args["base_scale"], m.ckpt.config.base_scale);
    assert_eq!(get("source_sha256"), compile::sha256_file(&m.ckpt.source)?);
    assert!(get("producer").starts_with("ngpt "));
    let passes: Vec<&str> = passes::CANONICAL.iter().map(|p| p.name).collect();
    assert_eq!(get("passes"), passes.join(","));
    let kv = get("kv_cache");
    assert!(
        kv.contains("h.{i}.attn.k.pos_norm") && kv.contains("h.{i}.attn.v"),
        "{kv}"
    );
    assert_eq!(get("max_seq_len"), "2048");
    assert_eq!(get("weights_dtype"), "f32");
    // tract sees the same metadata.
    let s = Session::from_bytes(&e.model)?;
    assert_eq!(s.max_seq_len, Some(2048));
    assert_eq!(s.metadata.get("kv_cache"), Some(&kv));
    Ok(())
}

#[test]
fn standard_ops_only_names_trace_back_and_scalars_are_rank0() -> Result<()> {
    let m = nv_tiny()?;
    let c = compiled(&m.ckpt)?;
    let e = export(&m.ckpt, &c, &Options::for_config(&m.ckpt.config))?;
    let model = ModelProto::decode(&e.model[..])?;
    let g = model.graph.as_ref().unwrap();
    let ops: BTreeSet<&str> = g.node.iter().map(|n| n.op_type()).collect();
    assert!(!ops.contains("LpNormalization"));
    for n in &g.node {
        assert!(n.domain.as_deref().unwrap_or("").is_empty(), "{}", n.name());
        let scope = n.name().split('/').next().unwrap();
        assert!(
            c.graph.find(scope).is_some()
                || ["attention.mask", "position_table.diag.32"].contains(&scope)
                || g.initializer.iter().any(|t| t.name() == scope),
            "node `{}` does not name an IR node",
            n.name()
        );
    }
    assert!(g
        .node
        .iter()
        .any(|n| n.name() == "h.0.attn.q.pos_norm/ReduceSumSquare"));
    // Range takes scalars: its initializer inputs are rank 0, and so are the Gathers that
    // read one dimension out of a Shape.
    for n in g.node.iter().filter(|n| n.op_type() == "Range") {
        for i in &n.input {
            if let Some(t) = g.initializer.iter().find(|t| t.name() == i) {
                assert!(t.dims.is_empty(), "Range input `{i}` has dims {:?}", t.dims);
            }
        }
    }
    for n in g
        .node
        .iter()
        .filter(|n| n.name().starts_with("attention.mask/Gather"))
    {
        let t = g
            .initializer
            .iter()
            .find(|t| t.name() == n.input[1])
            .unwrap();
        assert!(t.dims.is_empty());
    }
    // Weights are stored transposed for MatMul, under the IR's (checkpoint) names.
    let w = g
        .initializer
        .iter()
        .find(|t| t.name() == "transformer.h.0.att_c_proj.weight")
        .unwrap();
    assert_eq!(w.dims, [64, 64]);
    let fc = g
        .initializer
        .iter()
        .find(|t| t.name() == "transformer.h.0.c_fc.weight.folded")
        .unwrap();
    assert_eq!(fc.dims, [64, 512]);
    Ok(())
}

#[test]
fn same_checkpoint_gives_byte_identical_models() -> Result<()> {
    let m = nv_tiny()?;
    let a = export(
        &m.ckpt,
        &compiled(&m.ckpt)?,
        &Options::for_config(&m.ckpt.config),
    )?;
    let ckpt = import::load(&fixture())?;
    let b = export(&ckpt, &compiled(&ckpt)?, &Options::for_config(&ckpt.config))?;
    assert!(a.model == b.model, "two exports differ");
    // Written to a directory: the same bytes, inline.
    let c = compiled(&ckpt)?;
    let dir = tempfile::tempdir()?;
    let info = onnx::ModelInfo::new(&ckpt, &c.records)?;
    let w = onnx::write(
        &c.graph,
        &info,
        &Options::for_config(&ckpt.config),
        dir.path(),
    )?;
    assert_eq!(w.files, ["model.onnx"]);
    let names: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(names, ["model.onnx"], "the staged weights file is removed");
    assert_eq!(w.model_bytes, a.model.len() as u64);
    assert!(std::fs::read(dir.path().join("model.onnx"))? == a.model);
    // Initializers are encoded after the graph's other fields; a decode and re-encode in
    // prost's field order gives the same model.
    let decoded = ModelProto::decode(&a.model[..])?;
    assert_eq!(ModelProto::decode(&decoded.encode_to_vec()[..])?, decoded);
    Ok(())
}

#[test]
fn summary_snapshot() -> Result<()> {
    let m = nv_tiny()?;
    let c = compiled(&m.ckpt)?;
    let e = export(&m.ckpt, &c, &Options::for_config(&m.ckpt.config))?;
    insta::assert_snapshot!("nv_tiny_f32", summary(&ModelProto::decode(&e.model[..])?));
    let mut opts = Options::for_config(&m.ckpt.config);
    opts.weights = WeightDtype::F16;
    opts.max_seq_len = 64;
    let e = export(&m.ckpt, &c, &opts)?;
    insta::assert_snapshot!("nv_tiny_f16", summary(&ModelProto::decode(&e.model[..])?));
    Ok(())
}

/// A rounded digest of the logits: first positions' top-3 ids and the overall relative
/// error bucket, so a snapshot catches a changed model without storing floats.
#[test]
fn logits_digest_snapshot() -> Result<()> {
    let m = nv_tiny()?;
    let s = session(&m.ckpt, &Options::for_config(&m.ckpt.config))?;
    let tokens = prompt(&m)?;
    let got = s.logits(&tokens)?;
    let mut lines = vec![];
    for (t, row) in got.chunks(s.vocab).enumerate().take(8) {
        let mut ids: Vec<usize> = (0..row.len()).collect();
        ids.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        lines.push(format!("position {t}: top-3 {:?}", &ids[..3]));
    }
    let c = compare(&f64s(&got), &reference(&m.ckpt, &tokens)?, s.vocab);
    lines.push(format!(
        "rel err vs reference below 1e-5: {}, top-1 {}/{}",
        c.rel_err <= 1e-5,
        c.top1_agree,
        c.positions
    ));
    insta::assert_snapshot!(lines.join("\n"));
    Ok(())
}

/// Every prefix of the passes exports and runs at parity: each IR op, literal or fused,
/// has a lowering. With the last-position pass, logits are for the last token only.
#[test]
fn every_pass_prefix_exports_at_parity() -> Result<()> {
    let m = nv_tiny()?;
    let tokens = prompt(&m)?;
    let want = reference(&m.ckpt, &tokens)?;
    let opts = Options::for_config(&m.ckpt.config);
    for n in 0..=passes::CANONICAL.len() {
        let c = compile::compile(
            &m.ckpt,
            &compile::Options {
                stop_after: Some(n),
                ..Default::default()
            },
        )?;
        let s = Session::from_bytes(&export(&m.ckpt, &c, &opts)?.model)?;
        check(
            &format!("after {n} passes"),
            compare(&f64s(&s.logits(&tokens)?), &want, s.vocab),
            1e-5,
            1.0,
        )?;
    }
    let mut g = ngpt_compiler::graph::literal(&m.ckpt)?;
    let records = passes::run(
        &mut g,
        &passes::Options {
            last_position_only: true,
            ..Default::default()
        },
    )?;
    let info = onnx::ModelInfo::new(&m.ckpt, &records)?;
    let e = onnx::export(&g, &info, &opts)?;
    let s = Session::from_bytes(&e.model)?;
    let got = s.logits(&tokens)?;
    assert_eq!(got.len(), s.vocab);
    let v = s.vocab;
    check(
        "last position only",
        compare(&f64s(&got), &want[want.len() - v..], v),
        1e-5,
        1.0,
    )
}

#[test]
fn positions_beyond_max_seq_len_are_refused() -> Result<()> {
    let m = nv_tiny()?;
    let mut opts = Options::for_config(&m.ckpt.config);
    opts.max_seq_len = 8;
    let s = session(&m.ckpt, &opts)?;
    assert!(s.logits(&[1, 2, 3, 4, 5, 6, 7, 8]).is_ok());
    let e = s
        .logits(&[1, 2, 3, 4, 5, 6, 7, 8, 9])
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_seq_len") && e.contains("8 rows"), "{e}");
    Ok(())
}
