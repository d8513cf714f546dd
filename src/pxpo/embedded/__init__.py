"""The embedded default: a tiny Stable-Diffusion-style pipeline built and pretrained offline.

``pxpo base build`` creates every component from scratch, with no download:

* a byte-level BPE tokenizer trained locally on the prompt corpus
  (:class:`transformers.CLIPTokenizer`, so the pipeline is a stock
  :class:`diffusers.StableDiffusionPipeline`),
* a tiny :class:`transformers.CLIPTextModel` (trained jointly with the UNet),
* a small :class:`diffusers.AutoencoderKL` with VAE factor 2
  (16 x 16 x 3 images <-> 8 x 8 x 4 latents),
* a :class:`diffusers.UNet2DConditionModel` with cross-attention at both levels,

then pretrains the VAE and the UNet + text encoder for a few CPU minutes on
scikit-learn's 8 x 8 handwritten digits (upsampled to 16 x 16, each copy inked in a
random colour on black) with prompts such as ``"a handwritten digit 7"`` that name no
colour, and saves it with ``save_pretrained``. The repository versions the result
(models/base, dvc.yaml stage ``base`` with ``cache: false``).
Everything else in pxpo loads models through ``from_pretrained(path_or_hub_id)``,
so this directory and a user's SD 1.x/2.x checkpoint take the same code path.

:func:`.architecture.make_tiny_pipeline` builds the same architecture with random weights in
well under a second: the test suite uses it (only the main job pretrains).

Modules: :mod:`.tokenizer` (the locally trained BPE tokenizer),
:mod:`.architecture` (component configs, random-weight pipeline),
:mod:`.digits` (the training data and the prompt-following check),
:mod:`.pretrain` (``pxpo base build``), :mod:`.lcm_distill`
(``pxpo base distill-lcm``). Only the CLI and the tests import this package;
the library itself never does.
"""
