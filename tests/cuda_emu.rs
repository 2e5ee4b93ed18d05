//! The CPU execution harness for our CUDA C (crates/cuda-emu): its primitives give CUDA's
//! results, and each diagnostic fires on the mistake it exists for. The kernels' own tests are
//! src/optim/device/emu_tests.rs (mfac.cu) and src/model/engine/emu_tests.rs (pass.cu).

use cuda_emu::{launch, selftest as st, Schedule};

/// One block of `threads` threads in the fixed order.
fn fixed(threads: u32, shared: usize, body: impl Fn()) -> Result<(), String> {
    launch([1, 1, 1], [threads, 1, 1], shared, Schedule::Fixed, body)
}

fn err_of(r: Result<(), String>) -> String {
    r.expect_err("the launch should have been refused")
}

#[test]
fn shuffles_and_votes_give_cudas_results() {
    for s in Schedule::all(1) {
        let mut out = vec![0i32; 64 * 9];
        let o = out.as_mut_ptr();
        launch([1, 1, 1], [64, 1, 1], 0, s, || unsafe {
            st::st_warp_ops(o)
        })
        .unwrap();
        for w in 0..2 {
            let o = &out[w * 32 * 9..];
            for l in 0..32i32 {
                let at = |k: usize| o[k * 32 + l as usize];
                assert_eq!(at(0), 105, "{s:?} idx");
                assert_eq!(at(1), 100 + if l >= 3 { l - 3 } else { l }, "{s:?} up");
                assert_eq!(
                    at(2),
                    100 + if l + 3 < 32 { l + 3 } else { l },
                    "{s:?} down"
                );
                assert_eq!(at(3), 100 + (l ^ 6), "{s:?} xor");
                // width 8: within each group of 8 lanes.
                assert_eq!(
                    at(4),
                    100 + if l % 8 + 3 < 8 { l + 3 } else { l },
                    "{s:?} down/8"
                );
                let x = l ^ 9;
                assert_eq!(
                    at(5),
                    100 + if x / 8 == l / 8 { x } else { l },
                    "{s:?} xor/8"
                );
                assert_eq!(at(6) as u32, 0x4924_9249, "{s:?} ballot");
                assert_eq!(at(7), 1, "{s:?} any/all");
                assert_eq!(at(8), 2 * (l ^ 1), "{s:?} f64 shuffle");
            }
        }
    }
}

#[test]
fn barriers_order_shared_memory_and_atomics_add_up_across_blocks() {
    let input: Vec<i32> = (0..4 * 256).map(|i| (i * 37 % 101) - 50).collect();
    let want: Vec<i32> = input.chunks(256).map(|c| c.iter().sum()).collect();
    for s in Schedule::all(2) {
        let (mut blocks, mut total) = (vec![0i32; 4], 0i32);
        let (i, b, t) = (input.as_ptr(), blocks.as_mut_ptr(), &mut total as *mut i32);
        launch([4, 1, 1], [256, 1, 1], 0, s, || unsafe {
            st::st_block_sum(i, b, t)
        })
        .unwrap();
        assert_eq!(blocks, want, "{s:?}");
        assert_eq!(total, want.iter().sum::<i32>(), "{s:?}");
    }
}

#[test]
fn a_barrier_reached_from_different_lines_is_named() {
    let e = err_of(fixed(64, 0, || unsafe { st::st_divergent_barrier() }));
    assert!(
        e.contains("different lines") && e.contains("selftest.cu"),
        "{e}"
    );
}

#[test]
fn a_barrier_after_some_threads_exited_is_an_error() {
    for s in Schedule::all(3) {
        let e = err_of(launch([1, 1, 1], [128, 1, 1], 0, s, || unsafe {
            st::st_barrier_after_exit()
        }));
        assert!(e.contains("after 64 of 128 threads exited"), "{s:?}: {e}");
    }
}

#[test]
fn a_shuffle_after_a_lane_exited_is_an_error() {
    let mut out = vec![0f32; 32];
    let o = out.as_mut_ptr();
    let e = err_of(fixed(32, 0, || unsafe { st::st_shuffle_after_exit(o) }));
    assert!(e.contains("after lane(s) 5 exited"), "{e}");
}

#[test]
fn a_deadlock_says_who_waits_where() {
    let mut out = vec![0f32; 64];
    let o = out.as_mut_ptr();
    let e = err_of(fixed(64, 0, || unsafe { st::st_deadlock(o) }));
    assert!(
        e.contains("deadlock") && e.contains("threads 0-15 wait at a warp shuffle"),
        "{e}"
    );
    assert!(e.contains("threads 16-31 wait at __syncthreads"), "{e}");
}

#[test]
fn misaligned_vector_loads_are_caught() {
    #[repr(C, align(16))]
    struct Aligned([f32; 16]);
    let buf = Aligned([1.0; 16]);
    let mut out = vec![0f32; 32];
    let (p, o) = (buf.0.as_ptr(), out.as_mut_ptr());
    let e = err_of(fixed(32, 0, || unsafe { st::st_misaligned_vector(p, o) }));
    assert!(
        e.contains("misaligned") && e.contains("multiple of 16"),
        "{e}"
    );
    let e = err_of(fixed(32, 0, || unsafe { st::st_misaligned_ldcs(p, o) }));
    assert!(
        e.contains("misaligned load") && e.contains("multiple of 16"),
        "{e}"
    );
}

#[test]
fn dynamic_shared_memory_is_poisoned_and_bounded() {
    // A write one past the launched size is caught; inside it, fine.
    let e = err_of(fixed(32, 64, || unsafe { st::st_shared_overflow(8) }));
    assert!(
        e.contains("past the launched dynamic shared memory") && e.contains("acc"),
        "{e}"
    );
    fixed(32, 72, || unsafe { st::st_shared_overflow(8) }).unwrap();
    // What no thread wrote reads as NaN.
    let mut out = vec![0f64; 32];
    let o = out.as_mut_ptr();
    fixed(32, 256, || unsafe { st::st_shared_uninit(o) }).unwrap();
    assert!(out.iter().all(|x| x.is_nan()));
}

#[test]
fn warp_serial_schedules_show_a_missing_barrier_that_round_robin_hides() {
    let run = |barrier: i32, s: Schedule| {
        let mut out = vec![0f64; 8];
        let o = out.as_mut_ptr();
        launch([1, 1, 1], [256, 1, 1], 64, s, || unsafe {
            st::st_zero_then_add(barrier, o)
        })
        .unwrap();
        out
    };
    for s in Schedule::all(7) {
        assert_eq!(run(1, s), vec![1.0; 8], "{s:?}");
    }
    assert_eq!(
        run(0, Schedule::Fixed),
        vec![1.0; 8],
        "round-robin hides the race"
    );
    let shown = (0..8).any(|seed| run(0, Schedule::WarpSerial(seed)) != vec![1.0; 8]);
    assert!(shown, "no warp-serial seed showed the missing barrier");
}

#[test]
fn shuffled_schedules_show_a_race_that_thread_order_hides() {
    let run = |s: Schedule| {
        let mut out = vec![-1i32];
        let o = out.as_mut_ptr();
        launch([1, 1, 1], [64, 1, 1], 0, s, || unsafe {
            st::st_unordered_write_read(o)
        })
        .unwrap();
        out[0]
    };
    assert_eq!(run(Schedule::Fixed), 7);
    assert!(
        (0..16).any(|seed| run(Schedule::Shuffled(seed)) == 0),
        "no seed ran the reader first"
    );
}

#[test]
fn the_harness_converts_to_bf16_to_nearest_even() {
    // f32 → bf16 against half's (round to nearest even) on many values, subnormals, ties and
    // overflow included; f64 → bf16 is checked against the host window in the crate's tests.
    let mut z = 12345u64;
    for i in 0..200_000u32 {
        z = z
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let bits = match i % 4 {
            0 => (z >> 32) as u32,
            // Ties: the low 16 bits exactly 0x8000, odd and even neighbours.
            1 => ((z >> 32) as u32 & 0xffff_0000) | 0x8000,
            // Subnormals and values near the overflow boundary.
            2 => (z >> 32) as u32 & 0x807f_ffff,
            _ => 0x7f7f_0000 | ((z >> 48) as u32 & 0xffff),
        };
        let x = f32::from_bits(bits);
        let got = cuda_emu::float_to_bf16_bits(x);
        let want = half::bf16::from_f32(x);
        if x.is_nan() {
            assert!(half::bf16::from_bits(got).is_nan());
        } else {
            assert_eq!(got, want.to_bits(), "{x:e} ({bits:#010x})");
        }
    }
    assert_eq!(cuda_emu::float_to_bf16_bits(f32::MAX), 0x7f80);
    assert_eq!(cuda_emu::double_to_bf16_bits(1e300), 0x7f80);
    assert_eq!(cuda_emu::double_to_bf16_bits(-1e-300), 0x8000);
}
