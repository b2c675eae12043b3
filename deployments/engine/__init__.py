"""The model engine: everything that turns prompt token ids into streamed text on one device.

`protocol` (the contract and the messages that cross Ray) and `sampling_params` are torch-free, so the
ingress can import them; the rest loads torch. `reference` is transformers' `generate`;
`batched` is the continuous-batching engine over `forward` (the Llama pass over `weights`, with
the CPU's int8 / int4 layers in `quantized` and a layer's small ops behind `layer_ops`),
`kv_cache`, `sampler` and `detokenizer`, with `cuda_graphs` replaying its decode steps on a GPU.
"""
