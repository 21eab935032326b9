"""Benchmarks and kernel tools: how fast each attention kind runs, and whether the fast kernels compile.

    python -m bench ...               __main__.py: the command line (markdown tables + JSON)
    kernels.py                        attention kernels timed against flash softmax; `check`, every
                                      fast backend against the math reference
    training.py                       training-step throughput, MFU and peak memory per variant
    streaming.py                      the streaming row: eval.streaming's parallel form vs token-by-token
                                      vs transformers' own decoding of one imported model
    nanogpt_baseline.py               nanoGPT's GPT, the speed baseline at the same shapes
    python -m bench.compile_kernels   every Triton kernel config compiled for a GPU architecture, no GPU needed
    python -m bench.hashes            what the checkpoint manifest's content hashes cost per file size
    bash bench/gpu_check.sh           the GPU check: correctness tests, then the timings

Above model/ and eval/ (the streaming row times eval.streaming).
"""
