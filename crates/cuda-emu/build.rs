//! Compiles the harness (src/emu.cpp) and the project's CUDA C — the same files build.rs gives
//! nvcc, not copies — as C++ with include/emu.h force-included, into one static library.
use std::path::PathBuf;

/// The kernel files, relative to this crate.
const KERNELS: [&str; 3] = [
    "../../src/optim/mfac/window/device/kernels/mfac.cu",
    "../../src/optim/mfac/window/device/kernels/sparse.cu",
    "../../src/model/engine/cuda/kernels/pass.cu",
];

/// Headers the kernel files include (a change recompiles them).
const HEADERS: [&str; 1] = ["../../src/optim/mfac/window/device/kernels/common.cuh"];

fn main() {
    let here = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let include = here.join("include");
    println!("cargo:rerun-if-changed=build.rs");
    for f in [
        "include/emu.h",
        "include/cuda_bf16.h",
        "src/emu.cpp",
        "src/selftest.cu",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .include(&include)
        .warnings(false)
        // The kernels type-pun through uint4; block-scope `extern thread_local` arrays (the
        // `extern __shared__` ones) crash g++ 12's TLS wrapper without -fno-extern-tls-init.
        .flag("-fno-strict-aliasing")
        .flag("-fno-extern-tls-init")
        .flag("-Wno-unknown-pragmas")
        // Misaligned plain loads/stores land in emu.cpp's hook (no sanitizer runtime linked).
        .flag("-fsanitize=alignment")
        // CUDA's fma is one rounding; so is the C library's. No contraction beyond what the
        // source writes (nvcc's -fmad=true contracts a*b+c: the tests' tolerances cover it).
        .flag("-ffp-contract=off")
        .file(here.join("src/emu.cpp"))
        .file(here.join("src/selftest.cu"));
    for h in HEADERS {
        println!("cargo:rerun-if-changed={}", here.join(h).display());
    }
    for k in KERNELS {
        let path = here.join(k);
        println!("cargo:rerun-if-changed={}", path.display());
        b.file(path);
    }
    // The .cu files are C++ with emu.h first: `-x c++` must come before them, which cc does
    // not do per file, so the whole compilation is C++ (emu.cpp included) via the flags.
    b.flag("-x").flag("c++").flag("-include").flag("emu.h");
    b.compile("cuda_emu");
}
