"""The model engine: everything that turns prompt token ids into streamed text on one device.

`protocol` (the contract and the messages that cross Ray) and `sampling_params` are torch-free,
so the ingress can import them; the rest loads torch. `reference` is transformers' `generate`.
`batched` is the continuous-batching engine, whose loop reads plan -> run -> emit:
- plan: `scheduler` (admission, slots, prefix caching, prompt chunks) over `sequence`;
- run: `model_runner` (per device kind) over `kv_cache`, `forward` (the Llama pass over
  `weights`, the CPU's int8 / int4 layers in `quantized`, a layer's small ops behind
  `layer_ops`: `cpu_layer_ops` / `cpu_kernels` / `cpu_int4` in C on a CPU, `fused_layer_ops`
  and `cached_attention` in Triton on a GPU), `cuda_graphs` (a GPU's decode steps), `sampler`
  and `grammar` (structured outputs' masks);
- emit: `outputs` (stops, coalescing) over `detokenizer`.
"""
