"""Device profiles and per-device benchmarks (device side: uses runtime/, never torch or the toolchain)."""
