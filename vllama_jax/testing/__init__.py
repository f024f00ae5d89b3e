"""PyTorch references and test helpers, in one place: transformers-built Video-LLaMA parts (`torch_reference`),
the real ImageBind code (`imagebind_reference`) and torchaudio's Kaldi fbank (`kaldi_reference`). Used by the tests
and the benchmark; they need the `test` extra (torch)."""
