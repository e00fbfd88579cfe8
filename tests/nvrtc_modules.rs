//! The runtime's `ngpt` module, specialized for the tiny, small and 0.5b plans (f32 and
//! bf16) and the Hugging Face family's nous-tiny, nous-0.5b and odd-shaped plans, as the
//! compiler names it and the contract checks it, compiles with NVRTC for sm_90
//! through the runtime's own path. CI installs the nvidia-cuda-nvrtc wheel
//! and points the loader at it, so CUDA code that CI cannot run is still compiled there.

use anyhow::Result;
use ngpt_compiler::config::Config;
use ngpt_compiler::init::{Family, InitOptions, Preset, Spec};
use ngpt_compiler::plan::kernel_module;
use ngpt_runtime::contract;

/// The source the CUDA executor compiles for a plan of `cfg` with `max_seq` positions: the
/// compiler's module description, checked by the runtime's contract, behind the runtime's
/// prelude.
fn module_source(cfg: &Config, max_seq: usize) -> Result<String> {
    let dims = contract::Dims {
        n_layer: cfg.n_layer,
        n_head: cfg.n_head,
        n_embd: cfg.n_embd,
        head_dim: cfg.head_dim(),
        vocab: cfg.vocab_size,
        max_seq_len: max_seq,
        n_inner: cfg.n_inner,
    };
    let md =
        contract::check_module(&kernel_module(cfg, max_seq), &dims).map_err(anyhow::Error::msg)?;
    Ok(ngpt_runtime::cuda::module_source(&dims, &md))
}

/// Whether this process has libnvrtc; under CI=true its absence is an error, never a skip.
fn nvrtc_here() -> Result<bool> {
    if ngpt_runtime::cuda::probe().nvrtc {
        return Ok(true);
    }
    // CI sets LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel, so this runs there.
    eprintln!("skipping: libnvrtc not found (install nvidia-cuda-nvrtc==13.0.* and add its lib folder to LD_LIBRARY_PATH)");
    if std::env::var_os("CI").is_some() {
        anyhow::bail!("CI must provide libnvrtc for this check");
    }
    Ok(false)
}

#[test]
fn every_module_compiles_for_sm_90() -> Result<()> {
    if !nvrtc_here()? {
        return Ok(());
    }
    let cache = tempfile::tempdir()?;
    std::env::set_var("NGPT_CACHE_DIR", cache.path());
    let mut compiled = 0;
    for preset in [Preset::Tiny, Preset::Small, Preset::Half] {
        let cfg = InitOptions::preset(preset).config()?;
        // The module does not depend on the weight dtype (bf16 plans widen in the GEMMs):
        // two KV capacities instead.
        for max_seq in [cfg.block_size.max(2048), 96] {
            let src = module_source(&cfg, max_seq)?;
            let ptx = ngpt_runtime::cuda::compile_module("ngpt", &src, "sm_90")?;
            for entry in ngpt_compiler::plan::ENTRIES {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{preset:?} max_seq {max_seq}: no entry {entry} in the PTX"
                );
            }
            compiled += 1;
        }
    }
    assert_eq!(compiled, 6);
    // Head widths the tiled attention kernels handle differently: not a multiple of 4
    // (12), one P.V group with 16-row query tiles (96, 128), and the simple fallback (256).
    for (heads, embd) in [(3, 36), (2, 192), (4, 512), (2, 512)] {
        let mut o = InitOptions::preset(Preset::Tiny);
        o.n_head = heads;
        o.n_embd = embd;
        let cfg = o.config()?;
        let ptx = ngpt_runtime::cuda::compile_module("ngpt", &module_source(&cfg, 64)?, "sm_90")?;
        for entry in [
            "attention_prefill",
            "attention_decode",
            "attention_prefill_simple",
            "attention_decode_simple",
        ] {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "head_dim {}: no entry {entry}",
                embd / heads
            );
        }
    }
    // The Hugging Face family's plans: nous-tiny, the published 0.5B's shape, and odd shapes
    // (head_dim 16, n_inner 100, not 4 x n_embd), each at its KV capacity (wpe's rows).
    let odd = Spec {
        opts: InitOptions {
            n_layer: 3,
            n_head: 3,
            n_embd: 48,
            vocab_size: 37,
            block_size: 40,
            ..InitOptions::preset(Preset::NousTiny)
        },
        family: Family::Nous,
        n_inner: Some(100),
    };
    for spec in [
        Spec::preset(Preset::NousTiny),
        Spec::preset(Preset::NousHalf),
        odd,
    ] {
        let cfg = spec.config()?;
        let module = kernel_module(&cfg, cfg.n_positions);
        assert!(module.defines.iter().any(|d| d.name == "NGPT_I"));
        let src = module_source(&cfg, cfg.n_positions)?;
        assert!(src.contains(&format!("#define NGPT_I {}\n", cfg.n_inner)));
        let ptx = ngpt_runtime::cuda::compile_module("ngpt", &src, "sm_90")?;
        for entry in &module.entries {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "Hugging Face family, n_embd {}: no entry {entry} in the PTX",
                cfg.n_embd
            );
        }
        assert_eq!(module.entries, ngpt_compiler::plan::NOUS_ENTRIES);
    }
    // The second compile of the same source comes from the cache.
    let cfg = InitOptions::preset(Preset::Tiny).config()?;
    let src = module_source(&cfg, 2048)?;
    let t0 = std::time::Instant::now();
    ngpt_runtime::cuda::compile_module("ngpt", &src, "sm_90")?;
    assert!(std::fs::read_dir(cache.path())?.count() >= 6);
    eprintln!("cached compile took {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn a_broken_module_reports_the_nvrtc_log() -> Result<()> {
    if !nvrtc_here()? {
        return Ok(());
    }
    let err = ngpt_runtime::cuda::compile_module(
        "broken",
        "extern \"C\" __global__ void f() { undefined_thing(); }",
        "sm_90",
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("broken") && msg.contains("undefined_thing"),
        "{msg}"
    );
    Ok(())
}
