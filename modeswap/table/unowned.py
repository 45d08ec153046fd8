"""ATen ops that draw random numbers or take a mode argument, and that no rule owns: each with its reason.

The completeness test (``tests/unit/table/test_completeness.py``) enumerates every
ATen overload whose schema has an argument named ``train``, ``training``,
``use_input_stats`` or ``dropout_p``, or that carries
``torch.Tag.nondeterministic_seeded``. Each must be owned by a rule
(``rules.RULES``), be what ``run_decompositions()`` makes of one
(``rules.DECOMPOSED``), or be listed here, so a new torch that adds such an op
fails the test until someone decides where it goes.

Keys are an op's name (``"aten.randn"``: every overload) or one overload's
(``"aten.native_dropout.out"``), as strings, so the table reads the same on a
torch that lacks an op. A reason that begins ``torch X.Y+:`` names an op that
older torch releases do not have.
"""

from __future__ import annotations

#: Random in both modes: eager code calls them whatever ``module.training`` says. A swap leaves
#: them alone; ``ModeReport.stochastic`` lists them, and ``to_eval`` warns when one is left.
RANDOM: dict[str, str] = {
    "aten._sample_dirichlet": "Dirichlet sampling behind torch.distributions.Dirichlet; not gated by module.training",
    "aten._standard_gamma": "Gamma sampling behind torch.distributions.Gamma/Beta/Dirichlet; not gated by module.training",
    "aten.bernoulli": "samples Bernoulli draws; eager code calls it in both modes (timm/torchvision drop path use bernoulli_)",
    "aten.bernoulli_": "in-place Bernoulli sampling; eager code calls it in both modes (drop-path idioms use it)",
    "aten.binomial": "samples binomial counts (torch.distributions); not gated by module.training",
    "aten.cauchy": "functional form of cauchy_ (functionalization); samples in both modes",
    "aten.cauchy_": "fills with Cauchy samples; not gated by module.training",
    "aten.exponential": "functional form of exponential_ (functionalization); samples in both modes",
    "aten.exponential_": "fills with exponential samples; not gated by module.training",
    "aten.geometric": "functional form of geometric_ (functionalization); samples in both modes",
    "aten.geometric_": "fills with geometric samples; not gated by module.training",
    "aten.log_normal": "functional form of log_normal_ (functionalization); samples in both modes",
    "aten.log_normal_": "fills with log-normal samples; not gated by module.training",
    "aten.multinomial": "samples indices (sampling heads, MoE routing); not gated by module.training",
    "aten.normal": "samples Gaussian noise (torch.normal); not gated by module.training",
    "aten.normal_": "fills with Gaussian samples (init, noise layers); not gated by module.training",
    "aten.normal_functional": "functional form of normal_ (functionalization); samples in both modes",
    "aten.poisson": "samples Poisson counts; not gated by module.training",
    "aten.rand": "uniform noise (torch.rand; transformers' drop_path starts with it); drawn in both modes",
    "aten.rand_like": "uniform noise like a tensor; drawn in both modes",
    "aten.randint": "random integers; drawn in both modes",
    "aten.randint_like": "random integers like a tensor; drawn in both modes",
    "aten.randn": "Gaussian noise (torch.randn; diffusion, VAE reparameterisation); drawn in both modes",
    "aten.randn_like": "Gaussian noise like a tensor (VAE reparameterisation); drawn in both modes",
    "aten.random": "functional form of random_ (functionalization); samples in both modes",
    "aten.random_": "fills with random integers; not gated by module.training",
    "aten.randperm": "random permutation (shuffles, token dropping); drawn in both modes",
    "aten.uniform": "functional form of uniform_ (functionalization); samples in both modes",
    "aten.uniform_": "fills with uniform samples (init, noise); not gated by module.training",
}

#: Not in a forward graph that ``torch.export`` makes of ``nn`` or functional code: backward ops,
#: kernels chosen below autograd, backend internals and test helpers. Only a direct
#: ``torch.ops.aten`` call could put one in a graph.
UNREACHABLE: dict[str, str] = {
    "aten._batch_norm_impl_index_backward": "backward of _batch_norm_impl_index: autograd's, not in a forward graph",
    "aten._cudnn_attention_backward": "backward of _cudnn_attention_forward: autograd's, not in a forward graph",
    "aten._cudnn_attention_forward": "cuDNN attention kernel under _scaled_dot_product_cudnn_attention; below autograd, nn code never emits it",
    "aten._cudnn_attention_forward_no_dropout_inplace": "torch 2.15+: in-place cuDNN attention kernel variant (CUDA) without dropout; below autograd, nn code never emits it",
    "aten._cudnn_init_dropout_state": "allocates cuDNN's RNN dropout state (C++ cuDNN RNN path, torch.backends.cudnn.rnn helper); nn forward code never emits it",
    "aten._cudnn_rnn": "cuDNN kernel lstm/gru/rnn_* dispatch to below autograd; nn code never emits it",
    "aten._cudnn_rnn_backward": "backward of _cudnn_rnn: autograd's, not in a forward graph",
    "aten._efficient_attention_backward": "backward of _efficient_attention_forward: autograd's, not in a forward graph",
    "aten._efficient_attention_forward": "mem-efficient kernel under _scaled_dot_product_efficient_attention (CUDA); below autograd, nn code never emits it",
    "aten._fill_mem_eff_dropout_mask_": "test helper that rebuilds the mem-efficient attention dropout mask from a seed; no nn code calls it",
    "aten._flash_attention_backward": "backward of _flash_attention_forward: autograd's, not in a forward graph",
    "aten._flash_attention_forward.default": "FlashAttention kernel under _scaled_dot_product_flash_attention (CUDA); below autograd, nn code never emits it",
    "aten._flash_attention_forward.quantized": "FP8 (descale) FlashAttention kernel; below autograd, nn code never emits it",
    "aten._flash_attention_forward_no_dropout_inplace": "in-place FlashAttention kernel variant (CUDA) without dropout; below autograd, nn code never emits it",
    "aten._fused_dropout": "CUDA-only kernel (no CPU kernel) under native_dropout; nn code never calls it and run_decompositions keeps native_dropout",
    "aten._fused_sdp_choice": "sdpa's backend selector, returns an int inside sdpa's kernel; draws nothing despite its nondeterministic_seeded tag",
    "aten._lstm_mps": "MPS kernel lstm dispatches to below autograd (Apple GPUs); nn code never emits it",
    "aten._nested_tensor_softmax_with_shape": "NestedTensor-only softmax kernel (no dense kernel); dense nn code never emits it; draws nothing despite its nondeterministic_seeded tag",
    "aten._scaled_dot_product_attention_math_for_mps": "MPS math-attention kernel chosen below autograd on Apple GPUs; nn code never emits it",
    "aten._scaled_dot_product_cudnn_attention_backward": "backward of _scaled_dot_product_cudnn_attention: autograd's, not in a forward graph",
    "aten._scaled_dot_product_efficient_attention_backward": "backward of _scaled_dot_product_efficient_attention: autograd's, not in a forward graph",
    "aten._scaled_dot_product_flash_attention.quantized": "FP8 attention: only torch.nn.attention.experimental._scaled_dot_product_attention_quantized calls it, dropout_p fixed 0.0, forward-only",
    "aten._scaled_dot_product_flash_attention_backward": "backward of _scaled_dot_product_flash_attention: autograd's, not in a forward graph",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward": "backward of _scaled_dot_product_flash_attention_for_cpu: autograd's, not in a forward graph",
    "aten._scaled_dot_product_fused_attention_overrideable_backward": "backward of _scaled_dot_product_fused_attention_overrideable: autograd's, not in a forward graph",
    "aten._triton_scaled_dot_attention": "test op with only a CUDA (Triton) kernel; no nn/functional code calls it",
    "aten.cudnn_batch_norm": "cuDNN kernel batch_norm picks below autograd (nn code never emits it); the default table decomposes a hand call via native_batch_norm",
    "aten.lstm_mps_backward": "backward of _lstm_mps: autograd's, not in a forward graph",
    "aten.miopen_batch_norm": "MIOpen (ROCm) kernel batch_norm picks below autograd; nn code never emits it",
    "aten.miopen_rnn": "MIOpen (ROCm) kernel lstm/gru/rnn_* dispatch to below autograd; nn code never emits it",
    "aten.miopen_rnn_backward": "backward of miopen_rnn: autograd's, not in a forward graph",
    "aten.mkldnn_rnn_layer": "oneDNN kernel the CPU lstm may dispatch to below autograd; nn code never emits it",
    "aten.mkldnn_rnn_layer_backward": "backward of mkldnn_rnn_layer: autograd's, not in a forward graph",
    "aten.native_batch_norm_backward": "backward of native_batch_norm: autograd's, not in a forward graph",
    "aten.native_dropout.out": "out= form of native_dropout: torch.native_dropout takes no out=, functional IR never emits it",
    "aten.quantized_gru": "dynamic-quantized nn.GRU (train=self.training, always False); its torchbind CellParamsBase makes export fail",
    "aten.quantized_lstm": "dynamic-quantized nn.LSTM (train=self.training, always False); its torchbind CellParamsBase makes export fail",
    "aten.rrelu_with_noise_backward": "backward of rrelu_with_noise: autograd's, not in a forward graph",
    "aten._native_batch_norm_legit.no_stats": "what run_decompositions() makes of a batch norm without running stats: batch statistics in both modes, nothing to swap",
    "aten._native_batch_norm_legit.no_stats_out": "out= form of _native_batch_norm_legit.no_stats: batch statistics in both modes, nothing to swap",
}
