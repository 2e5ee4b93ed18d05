//! Build script: with the `cuda` feature, compiles M-FAC's device kernels
//! (src/optim/device/kernels/mfac.cu) with nvcc into one fatbin — sm_90a machine code for the
//! H100/H200 (nothing is JIT-compiled at the first step) plus compute_90 PTX for later GPUs —
//! which src/optim/device/cuda.rs embeds; and bakes the GPU machine's library folders into the
//! binaries' run path (../shared/docs/gpu.md). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &str = "src/optim/device/kernels/mfac.cu";

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
    println!("cargo:rerun-if-changed={KERNELS}");
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
    let fatbin = out.join("mfac.fatbin");
    let report = out.join("mfac-resource-usage.txt");
    let output = Command::new(&nvcc)
        .args([
            "--fatbin",
            "-O3",
            "-std=c++17",
            "--resource-usage",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_90,code=compute_90",
            "-o",
        ])
        .arg(&fatbin)
        .arg(KERNELS)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nvcc ({}): {e}; the `cuda` feature needs a CUDA 13.0 toolchain \
                 (scripts/cuda-build.sh sets one up)",
                nvcc.display()
            )
        });
    // nvcc's resource report (registers, shared memory, spills per kernel) goes to stderr.
    let _ = std::fs::write(&report, &output.stderr);
    if !output.status.success() {
        panic!(
            "nvcc failed on {KERNELS}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    compile_pass_kernels(&nvcc, &out); // issue 13: the CUDA pass's kernels
    for dir in RPATHS {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

/// Issue 13: the CUDA pass's kernels (src/model/engine/cuda/kernels/pass.cu) into
/// `OUT_DIR/pass.fatbin`, the same targets as M-FAC's (sm_90a SASS + compute_90 PTX), embedded
/// by src/model/engine/cuda/device.rs; nvcc's resource report in `pass-resource-usage.txt`.
fn compile_pass_kernels(nvcc: &std::path::Path, out: &std::path::Path) {
    const PASS: &str = "src/model/engine/cuda/kernels/pass.cu";
    println!("cargo:rerun-if-changed={PASS}");
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
        .arg(out.join("pass.fatbin"))
        .arg(PASS)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nvcc ({}): {e}", nvcc.display()));
    let _ = std::fs::write(out.join("pass-resource-usage.txt"), &output.stderr);
    if !output.status.success() {
        panic!(
            "nvcc failed on {PASS}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
