//! Build script: with the `cuda` feature, compiles M-FAC's device kernels
//! (src/optim/mfac/window/device/kernels/mfac.cu, and sparse.cu for the sparse window) with nvcc,
//! each into one fatbin — sm_90a machine code for the
//! H100/H200 (nothing is JIT-compiled at the first step) plus compute_90 PTX for later GPUs —
//! which src/optim/mfac/window/device/cuda.rs embeds; and bakes the GPU machine's library folders into the
//! binaries' run path (../shared/docs/gpu.md). Without the feature it does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &str = "src/optim/mfac/window/device/kernels/mfac.cu";
const SPARSE_KERNELS: &str = "src/optim/mfac/window/device/kernels/sparse.cu";
/// Included by both M-FAC kernel files.
const KERNEL_HEADER: &str = "src/optim/mfac/window/device/kernels/common.cuh";
const PASS_KERNELS: &str = "src/model/engine/cuda/kernels/pass.cu";

/// Where the GPU machine keeps libcuda, libcublas, libcurand and libcudart (gpu.md).
const RPATHS: [&str; 3] = [
    "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib",
    "/usr/local/cuda/lib64",
    "/usr/local/nvidia/lib64",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
                .iter()
                .filter_map(std::env::var_os)
                .map(|root| PathBuf::from(root).join("bin/nvcc"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // M-FAC's window (src/optim/mfac/window/device/cuda.rs) and the CUDA pass (src/model/engine/cuda).
    println!("cargo:rerun-if-changed={KERNEL_HEADER}");
    compile_fatbin(&nvcc, &out, KERNELS, "mfac");
    // Sparse M-FAC's window (src/optim/mfac/window/device/sparse_cuda.rs).
    compile_fatbin(&nvcc, &out, SPARSE_KERNELS, "sparse");
    compile_fatbin(&nvcc, &out, PASS_KERNELS, "pass");
    for dir in RPATHS {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

/// Compiles `src` into `OUT_DIR/NAME.fatbin` (sm_90a SASS + compute_90 PTX), embedded with
/// `include_bytes!`; nvcc's resource report (registers, shared memory, spills per kernel, on
/// stderr) goes to `NAME-resource-usage.txt`.
fn compile_fatbin(nvcc: &Path, out: &Path, src: &str, name: &str) {
    println!("cargo:rerun-if-changed={src}");
    let output = Command::new(nvcc)
        .args([
            "--fatbin",
            "-O3",
            "-std=c++17",
            "--resource-usage",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_90,code=compute_90",
            "-o",
        ])
        .arg(out.join(format!("{name}.fatbin")))
        .arg(src)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nvcc ({}): {e}; the `cuda` feature needs a CUDA 13.0 toolchain \
                 (scripts/cuda-build.sh sets one up)",
                nvcc.display()
            )
        });
    let _ = std::fs::write(
        out.join(format!("{name}-resource-usage.txt")),
        &output.stderr,
    );
    if !output.status.success() {
        panic!(
            "nvcc failed on {src}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
