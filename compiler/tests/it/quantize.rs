//! The quantize pass: it fires on every matmul weight, its dequantized weights are an
//! independent dequantization of its integers and scales and quantize the source within
//! half a step, renormalized rows keep their source norm, odd K (a short last block) works,
//! the int4 model.onnx runs in tract at parity with the IR on the same weights, and its
//! int8-activation matrices say MatMulNBits accuracy_level 4.

use std::path::Path;

use anyhow::Result;
use candle_core::DType;
use ngpt_compiler::compare::compare;
use ngpt_compiler::graph::{interp, Graph, Op};
use ngpt_compiler::import::{self, Checkpoint};
use ngpt_compiler::init::{self, InitOptions, Preset};
use ngpt_compiler::onnx::{self, tract::Session};
use ngpt_compiler::quant::{self, Bits};
use ngpt_compiler::reference::Precision;
use ngpt_compiler::{compile, passes};

fn nv_tiny() -> Result<Checkpoint> {
    Ok(import::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nv-tiny"),
    )?)
}

/// n_embd 96 (K = 96 and 384: a block of 64 leaves a short last block of 32), 3 heads,
/// vocab 211.
fn odd() -> Result<(tempfile::TempDir, Checkpoint)> {
    let dir = tempfile::tempdir()?;
    let mut o = InitOptions::preset(Preset::Tiny);
    o.n_layer = 2;
    o.n_head = 3;
    o.n_embd = 96;
    o.vocab_size = 211;
    init::write(dir.path(), &o)?;
    let c = import::load(dir.path())?;
    Ok((dir, c))
}

fn canonical(ckpt: &Checkpoint) -> Result<Graph> {
    Ok(compile::compile(ckpt, &compile::Options::default())?.graph)
}

fn quantized(ckpt: &Checkpoint, q: quant::Options) -> Result<compile::Compiled> {
    Ok(compile::compile(
        ckpt,
        &compile::Options {
            quantize: Some(q),
            ..Default::default()
        },
    )?)
}

/// `c` exported to ONNX (its bytes and its graph), as `ngpt compile` writes it.
fn exported(
    ckpt: &Checkpoint,
    c: &compile::Compiled,
) -> Result<(Vec<u8>, ngpt_schemas::onnx::GraphProto)> {
    use ngpt_schemas::prost::Message;
    let info = onnx::ModelInfo::new(ckpt, &c.records)?;
    let e = onnx::export(&c.graph, &info, &onnx::Options::for_config(&ckpt.config))?;
    let model = ngpt_schemas::onnx::ModelProto::decode(&e.model[..])?;
    assert!(model
        .opset_import
        .iter()
        .any(|o| o.domain.as_deref() == Some("com.microsoft")));
    Ok((e.model, model.graph.expect("a graph")))
}

/// tract on `model` beside the IR of `c` (f32) on 19 tokens: within 1e-5, every top-1
/// agreeing (`what` names the case in a failure).
fn tract_equals_the_ir(
    c: &compile::Compiled,
    model: &[u8],
    vocab: usize,
    what: &str,
) -> Result<()> {
    let s = Session::from_bytes(model)?;
    let toks: Vec<u32> = (0..19).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let pos: Vec<u32> = (0..19).collect();
    let ir = interp::run(&c.graph, &toks, &pos, Precision::F32)?[0]
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let t: Vec<f64> = s.logits(&toks)?.into_iter().map(f64::from).collect();
    let cmp = compare(&t, &ir, vocab);
    assert!(cmp.rel_err < 1e-5, "{what}: {}", cmp.rel_err);
    assert_eq!(cmp.top1_agree, toks.len(), "{what}");
    Ok(())
}

fn f64s(c: &ngpt_compiler::graph::Const) -> Result<Vec<f64>> {
    Ok(c.value_in(DType::F64)?.flatten_all()?.to_vec1()?)
}

/// The quantized weights of `g` with the float weights of `float` they came from.
fn pairs<'a>(
    g: &'a Graph,
    float: &'a Graph,
) -> Vec<(
    &'a str,
    &'a ngpt_compiler::graph::Const,
    &'a ngpt_compiler::graph::Const,
)> {
    g.nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::Const(c) if c.quant().is_some() => {
                let src = n.name.rsplit_once('.').map(|(s, _)| s)?;
                let f = float.const_of(float.find(src)?)?;
                Some((n.name.as_str(), c, f))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn the_pass_fires_and_its_weights_dequantize_as_an_independent_dequantization() -> Result<()> {
    let (_dir, odd) = odd()?;
    for (ckpt, block) in [(nv_tiny()?, 32), (odd, 64)] {
        let float = canonical(&ckpt)?;
        for bits in [Bits::Int8, Bits::Int4] {
            let mut opts = quant::Options::new(bits);
            opts.block = block;
            opts.lm_head = Some(bits);
            let c = quantized(&ckpt, opts)?;
            let record = c.records.last().expect("the quantize record");
            assert_eq!(record.name, passes::QUANTIZE);
            // q, k, v (fused or c_attn), the attention output, c_fc, c_proj; and lm_head.
            assert_eq!(record.rewrites, 4 * ckpt.config.n_layer + 1);
            let ps = pairs(&c.graph, &float);
            assert_eq!(ps.len(), record.rewrites);
            let qmax = f64::from(bits.qmax());
            for (name, q, f) in ps {
                let (n, k) = (q.dims()[0], q.dims()[1]);
                let rows = q.quant_rows(0, n)?.expect("quantized");
                let nb = k.div_ceil(block);
                assert_eq!((rows.ints.len(), rows.scales.len()), (n * k, n * nb));
                // Written here, not through quant::dequantize: scale (f16 widened) * q.
                let mine: Vec<f64> = (0..n * k)
                    .map(|j| {
                        let s = rows.scales[(j / k) * nb + (j % k) / block].to_f64();
                        s * f64::from(rows.ints[j])
                    })
                    .collect();
                assert_eq!(f64s(q)?, mine, "{name}: the IR's values are scale * q");
                // Each value within half a step (plus the f16 rounding of the scale) of the
                // float source, each block's largest magnitude at +-qmax.
                let src = f64s(f)?;
                for r in 0..n {
                    for b in 0..nb {
                        let span = r * k + b * block..r * k + ((b + 1) * block).min(k);
                        let s = rows.scales[r * nb + b].to_f64().abs();
                        let top = rows.ints[span.clone()]
                            .iter()
                            .map(|&v| f64::from(v).abs())
                            .fold(0.0, f64::max);
                        let amax = src[span.clone()].iter().fold(0f64, |m, v| m.max(v.abs()));
                        assert!(amax == 0.0 || top == qmax, "{name} row {r} block {b}");
                        for j in span {
                            let tol = s * 0.5 + amax * 2f64.powi(-10) + 1e-12;
                            assert!((mine[j] - src[j]).abs() <= tol, "{name}[{j}]");
                        }
                    }
                }
            }
            // Odd K: the 96-wide model's blocks of 64 end in a short block of 32.
            let text = c.graph.to_string();
            assert!(
                text.contains(&format!("{}/{block}", bits.as_str())),
                "{text}"
            );
        }
    }
    Ok(())
}

#[test]
fn renormalized_rows_keep_their_source_norm_to_f16_rounding() -> Result<()> {
    let (_dir, odd) = odd()?;
    for (ckpt, block) in [(nv_tiny()?, 32), (odd, 64)] {
        let float = canonical(&ckpt)?;
        for bits in [Bits::Int8, Bits::Int4] {
            let mut opts = quant::Options::new(bits);
            opts.block = block;
            opts.renorm = true;
            let c = quantized(&ckpt, opts)?;
            let (mut renormed, mut worst_plain, mut worst_renorm) = (0, 0f64, 0f64);
            for (name, q, f) in pairs(&c.graph, &float) {
                let fmt = q.quant().expect("quantized");
                assert_eq!(
                    fmt.renorm,
                    passes::quantize::unit_rows(name.rsplit_once('.').map_or(name, |p| p.0)),
                    "{name}"
                );
                let k = q.dims()[1];
                let (got, src) = (f64s(q)?, f64s(f)?);
                for r in 0..q.dims()[0] {
                    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let (a, b) = (
                        norm(&got[r * k..(r + 1) * k]),
                        norm(&src[r * k..(r + 1) * k]),
                    );
                    let rel = (a / b - 1.0).abs();
                    if fmt.renorm {
                        // The common factor is exact in f64; rounding each block scale to
                        // f16 moves the norm by at most 2^-11 relative, or 2^-25 absolute
                        // for a scale in f16's subnormal range (a small folded row scale).
                        let rows = q.quant_rows(r, 1)?.expect("quantized");
                        let smallest = rows
                            .scales
                            .iter()
                            .map(|s| s.to_f64().abs())
                            .filter(|s| *s > 0.0)
                            .fold(f64::INFINITY, f64::min);
                        let bound = 2f64.powi(-11) + 2f64.powi(-25) / smallest;
                        assert!(rel <= bound, "{name} row {r}: {rel:e} > {bound:e}");
                        worst_renorm = worst_renorm.max(rel);
                    } else {
                        worst_plain = worst_plain.max(rel);
                    }
                }
                renormed += usize::from(fmt.renorm);
            }
            // q/k/v (qkv or c_attn), c_fc, and NVIDIA's lm_head; never c_proj.
            assert!(renormed >= 2 * ckpt.config.n_layer, "{renormed}");
            eprintln!("{bits:?} block {block}: renormalized rows within {worst_renorm:.2e}, others {worst_plain:.2e}");
        }
    }
    Ok(())
}

#[test]
fn the_quantized_graph_stays_close_to_the_float_one() -> Result<()> {
    let ckpt = nv_tiny()?;
    let toks: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % 86).collect();
    let pos: Vec<u32> = (0..24).collect();
    let float = canonical(&ckpt)?;
    let f = interp::run(&float, &toks, &pos, Precision::F64)?[0]
        .flatten_all()?
        .to_vec1::<f64>()?;
    for (bits, tol) in [(Bits::Int8, 1e-2), (Bits::Int4, 1e-1)] {
        let c = quantized(&ckpt, quant::Options::new(bits))?;
        let q = interp::run(&c.graph, &toks, &pos, Precision::F64)?[0]
            .flatten_all()?
            .to_vec1::<f64>()?;
        let cmp = compare(&q, &f, 86);
        assert!(cmp.rel_err < tol, "{bits:?}: {}", cmp.rel_err);
    }
    Ok(())
}

#[test]
fn a_block_that_is_not_a_power_of_two_is_refused_in_one_line() -> Result<()> {
    let ckpt = nv_tiny()?;
    let mut opts = quant::Options::new(Bits::Int4);
    opts.block = 48;
    let err = compile::compile(
        &ckpt,
        &compile::Options {
            quantize: Some(opts),
            ..Default::default()
        },
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(!err.contains('\n') && err.contains("power of two"), "{err}");
    Ok(())
}

/// tract's MatMulNBits takes bits 4 (and 2), not 8 (tract-onnx 0.23's mat_mul_nbits.rs
/// refuses `bits=8`), so the int8 export is checked by onnxruntime in `.ci/run` only.
#[test]
fn int4_onnx_runs_in_tract_at_parity_with_the_ir_on_the_same_weights() -> Result<()> {
    let (_dir, odd) = odd()?;
    for (ckpt, block) in [(nv_tiny()?, 32), (odd, 64)] {
        let mut opts = quant::Options::new(Bits::Int4);
        opts.block = block;
        opts.lm_head = Some(Bits::Int4);
        opts.renorm = true;
        let c = quantized(&ckpt, opts)?;
        let (model, graph) = exported(&ckpt, &c)?;
        let nbits = graph
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("MatMulNBits"))
            .count();
        assert_eq!(nbits, 4 * ckpt.config.n_layer + 1);
        assert!(!graph
            .node
            .iter()
            .any(|n| n.op_type.as_deref() == Some("MatMul") && n.input[1].contains("weight")));
        tract_equals_the_ir(
            &c,
            &model,
            ckpt.config.vocab_size,
            &format!("block {block}"),
        )?;
    }
    Ok(())
}

/// `act_int8` matrices (`--quant-activations int8`: every quantized one, lm_head too) say
/// MatMulNBits `accuracy_level` 4 in model.onnx (onnxruntime may quantize their
/// activations to int8, as the plan does). The graph's meaning is unchanged: tract,
/// which does not quantize activations, computes the weight-only product at parity with
/// the IR.
#[test]
fn int8_activation_matrices_say_accuracy_level_4_and_keep_the_weight_only_meaning() -> Result<()> {
    let ckpt = nv_tiny()?;
    let mut opts = quant::Options::new(Bits::Int4);
    opts.act_int8 = true;
    // tract reads 4-bit MatMulNBits only.
    opts.lm_head = Some(Bits::Int4);
    let c = quantized(&ckpt, opts)?;
    let (model, graph) = exported(&ckpt, &c)?;
    let mut levels = std::collections::BTreeMap::<(bool, i64), usize>::new();
    for n in graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("MatMulNBits"))
    {
        let level = n
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("accuracy_level"))
            .and_then(|a| a.i)
            .expect("an accuracy_level");
        *levels
            .entry((n.input[1].starts_with("lm_head"), level))
            .or_default() += 1;
    }
    let want = [((false, 4), 4 * ckpt.config.n_layer), ((true, 4), 1)];
    assert_eq!(
        levels,
        want.into_iter().collect(),
        "(lm_head, level): count"
    );
    tract_equals_the_ir(&c, &model, ckpt.config.vocab_size, "act-int8")?;
    Ok(())
}
