//! The runtime's kernel modules on the device: NVRTC's architecture name for the device
//! ([`arch_name`]), the kernels a plan launches ([`used_functions`]), loading compiled
//! PTX ([`load_ptx`]; compiling it, through the kernel cache, is `super::compile_module`)
//! and the plan's kernels from it with their shared memory limits raised
//! ([`load_functions`]).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys as cu, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use ngpt_schemas::plan::step;

use super::errors::{drv, plan_cuda_err, setup};
use crate::contract;
use crate::error::Result;
use crate::plan::LoadedPlan;

/// Dynamic shared memory a kernel gets without opting in.
pub(super) const DEFAULT_SHARED_LIMIT: u32 = 48 << 10;

/// NVRTC's name for a compute capability.
pub(super) fn arch_name(major: i32, minor: i32) -> Option<&'static str> {
    const ARCHS: [(i32, i32, &str); 12] = [
        (7, 5, "sm_75"),
        (8, 0, "sm_80"),
        (8, 6, "sm_86"),
        (8, 7, "sm_87"),
        (8, 9, "sm_89"),
        (9, 0, "sm_90"),
        (10, 0, "sm_100"),
        (10, 3, "sm_103"),
        (11, 0, "sm_110"),
        (12, 0, "sm_120"),
        (12, 1, "sm_121"),
        (12, 2, "sm_122"),
    ];
    ARCHS
        .iter()
        .find(|(a, b, _)| (*a, *b) == (major, minor))
        .map(|(_, _, n)| *n)
}

/// Every (module, entry) the programs launch, with the most dynamic shared memory a
/// launch of it asks for.
pub(super) fn used_functions(plan: &LoadedPlan) -> HashMap<(u32, String), u32> {
    let mut used: HashMap<(u32, String), u32> = HashMap::new();
    for program in [&plan.plan.prefill, &plan.plan.decode]
        .into_iter()
        .flatten()
    {
        for s in &program.steps {
            if let Some(step::Kind::Launch(l)) = s.kind.as_ref() {
                let e = used.entry((l.module, l.entry.clone())).or_insert(0);
                *e = (*e).max(l.shared_bytes);
            }
        }
    }
    used
}

pub(super) fn load_ptx(ctx: &Arc<CudaContext>, name: &str, ptx: String) -> Result<Arc<CudaModule>> {
    if ptx.contains('\0') {
        return Err(plan_cuda_err(format!(
            "kernel module `{name}`: the cached PTX holds a NUL byte (clear the kernel cache, {})",
            super::cache_dir().map_or("none".into(), |p| p.display().to_string())
        )));
    }
    ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
        plan_cuda_err(format!(
            "loading kernel module `{name}`: {} (a stale kernel cache? {})",
            drv(e),
            super::cache_dir().map_or("none".into(), |p| p.display().to_string())
        ))
    })
}

/// Each (module, entry)'s index among the loaded functions.
pub(super) type FunctionIndex = HashMap<(u32, String), usize>;

/// Loads every kernel of `used` (from [`used_functions`]) from `modules`, raising its
/// dynamic shared memory limit where it asks for more than the default (up to `optin`,
/// the device's limit); under `attention_simple` the `_simple` build of each attention
/// kernel. Returns the functions and each (module, entry)'s index among them.
pub(super) fn load_functions(
    modules: &[Option<Arc<CudaModule>>],
    used: HashMap<(u32, String), u32>,
    attention_simple: bool,
    optin: i32,
    device_name: &str,
) -> Result<(Vec<CudaFunction>, FunctionIndex)> {
    let mut functions = vec![];
    let mut function_of = HashMap::new();
    let mut sorted: Vec<_> = used.into_iter().collect();
    sorted.sort();
    for ((m, entry), shared) in sorted {
        let module = modules[m as usize]
            .as_ref()
            .ok_or_else(|| plan_cuda_err("internal: module not loaded"))?;
        let loaded_entry = if attention_simple && entry.starts_with("attention_") {
            format!("{entry}_simple")
        } else {
            entry.clone()
        };
        let f = module.load_function(&loaded_entry).map_err(|e| {
            plan_cuda_err(format!(
                "kernel `{entry}` of module `{}`: {}",
                contract::MODULE,
                drv(e)
            ))
        })?;
        if shared > DEFAULT_SHARED_LIMIT {
            if shared as i64 > optin as i64 {
                return Err(plan_cuda_err(format!(
                        "kernel `{entry}` asks for {shared} bytes of shared memory; {device_name} allows {optin}"
                    )));
            }
            f.set_attribute(
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared as i32,
            )
            .map_err(setup("raising a kernel's shared memory limit"))?;
        }
        function_of.insert((m, entry), functions.len());
        functions.push(f);
    }
    Ok((functions, function_of))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archs_are_named() {
        assert_eq!(arch_name(9, 0), Some("sm_90"));
        assert_eq!(arch_name(8, 6), Some("sm_86"));
        assert_eq!(arch_name(1, 0), None);
    }
}
