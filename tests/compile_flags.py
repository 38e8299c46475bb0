"""XLA flags of the test processes (the session's, set in conftest.py, and subprocesses that set their own)."""

# LLVM without its optimizations halves the CPU compiles (the smoke train step: 17 s -> 8 s; compiling is
# most of the suite's time) and runs steps ~2.5x slower. Results move at the rounding level (the smoke
# step's loss after 6 steps is the same to all digits); no test may hang on a last bit.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
