//! `ngpt bench`: its report and JSON line on a tiny model (no speed is asserted; speed is
//! recorded in BENCHMARKS.md), and its argument errors.

use crate::common;

use std::process::Command;

use anyhow::Result;
use common::*;
use ngpt_compiler::init;

#[test]
fn bench_reports_every_figure_for_plan_cpu_and_tract() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut o = small_opts();
    o.n_layer = 2;
    o.block_size = 64;
    init::write(&tmp.path().join("ckpt"), &o)?;
    let dir = tmp.path().join("out");
    let c = Command::new(ngpt_bin())
        .args(["compile", tmp.path().join("ckpt").to_str().unwrap(), "-o"])
        .arg(&dir)
        .output()?;
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    for engine in ["plan-cpu", "tract"] {
        let out = Command::new(ngpt_bin())
            .args(["bench", dir.to_str().unwrap(), "--engine", engine])
            .args([
                "--prompt-len",
                "7",
                "--gen-len",
                "5",
                "--batch",
                "2",
                "--runs",
                "2",
            ])
            .arg("--json")
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{engine}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for label in ["prefill", "decode", "first token", "floor", "load"] {
            assert!(stdout.contains(label), "{engine}: no {label} in {stdout}");
        }
        let last = stdout.lines().last().unwrap_or_default();
        let j: serde_json::Value = serde_json::from_str(last)?;
        assert_eq!(j["engine"], engine);
        for key in [
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "ttft_ms",
            "load_ms",
            "decode_floor_fraction",
            "decode_compute_floor_fraction",
            "prefill_floor_fraction",
        ] {
            let v = j[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "{engine}: {key} = {v} in {last}");
        }
        assert!(
            j["peak_rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "{last}"
        );
    }
    // Beyond the KV capacity, zero sizes, beyond memory: one-line errors.
    for args in [
        vec!["--prompt-len", "2040", "--gen-len", "10"],
        vec!["--batch", "0"],
        vec!["--engine", "reference"],
        // Far beyond memory: the plan's KV cache (reserved fallibly), and tract's prefill
        // (refused up front; tract would panic); both used to build the prompts first in
        // time quadratic in the batch.
        vec!["--batch", "1000000", "--prompt-len", "4", "--gen-len", "2"],
        vec![
            "--engine",
            "tract",
            "--batch",
            "1000000",
            "--prompt-len",
            "1000",
        ],
        vec!["--batch", "100000000000", "--prompt-len", "1000"],
        vec!["--prompt-len", "18446744073709551615", "--gen-len", "2"],
    ] {
        let out = Command::new(ngpt_bin())
            .args(["bench", dir.to_str().unwrap()])
            .args(&args)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{stderr}"
        );
    }
    Ok(())
}
