"""Engine benchmarks: stock diffusers against wan_engine on the same random weights at real size.

One command, ``python -m bench.engine`` (``__main__.py``), runs one study per call; each study is a
module here with a ``run`` function, over the shared helpers of ``bench.common`` and
``bench.real_size``:

- ``compare``: one clip through stock diffusers and one through ``WanGenerator``, side by side (the default);
- ``error``: how far exact mode is from stock, against a float32 reference (``--error-study``);
- ``memory``: ours alone, peak memory and the expert switch, on a smaller GPU too (``--memory-check``);
- ``streaming``: streamed experts against resident ones, bit for bit (``--streaming-check``);
- ``throughput``: per-clip step time with 1 or 2 clips per forward (``--throughput``);
- ``approximate``: the opt-in approximate modes against exact mode (``--approximate``);
- ``distilled``: the 4-step distilled recipe with LoRA adapters: stock, stock with its speed-ups and
  ours; the fused adapter's cost per step, the per-clip adapter slot's, swaps and recompilations
  (``--distilled``);
- ``summary``: ``engine-latest.{json,md}`` from the newest run of each config (``--summarize``).
"""
