"""Defaults shared by every preset; each preset's get_config() starts from `base()`.

Every field is documented here once. Presets override what differs and say why. Every field can
be overridden on the command line, e.g. `--config.train.lr=1e-5 --config.count.fraction=0.5`.
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "contrastive"       # contrastive (the counting fine-tune) | density (CLIP-Count)

  c.model = ml_collections.ConfigDict()
  c.model.init = ""            # HF hub id, local dir or gs:// dir to start from; "" = random init
  c.model.arch = "b32"         # models.ARCHITECTURES key, used when init is "" (and for shapes)
  c.model.dtype = "bfloat16"   # compute dtype; params stay float32
  # Rematerialise each transformer layer (activation memory for compute): False | True (keep
  # nothing) | a jax.checkpoint_policies name (models/clip.py REMAT_POLICIES), e.g.
  # "dots_with_no_batch_dims_saveable" (keep the weight matmuls: less recompute, more memory).
  c.model.remat = ml_collections.FieldReference(False, field_type=object)
  # The encoder layers under nn.scan, params stacked per tower (models/clip.py scanned_layers):
  # compile time flat in depth, the usual layout on TPU. HF files in and out are unchanged.
  c.model.scan_layers = False

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | records | tfds
  c.data.tokenizer = ""        # hub id or dir; "" = model.init's tokenizer, or built for the
                               # synthetic world's vocabulary when training from scratch
  c.data.context_length = 77   # text tokens (CLIP's is 77); captions are fitted around the number
  c.data.augment = False       # random resized crop for training images
  c.data.balance_numbers = True  # sample counting examples uniformly over two..ten
  # Host input (data/pipeline.py iterate; docs/PERFORMANCE.md "Can the input pipeline keep up?").
  c.data.num_threads = -1      # threads preparing examples per process (or per worker process);
                               # -1 = the host's cores (divided among the workers); 0 = none
  c.data.num_workers = 0       # grain worker processes per host making whole batches (0 = none:
                               # threads alone; the GIL caps them at ~2-3 threads' worth, so
                               # a TPU host feeding B/32 needs many, see PERFORMANCE.md)
  c.data.prefetch_buffer_size = 2  # batches prepared ahead on the host
  c.data.device_prefetch = 2   # batches placed on the devices ahead of the step (0 = none)
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.size = 100_000        # examples in the train split (held-out: eval.size)
  c.data.synthetic.distractor_prob = 0.3
  c.data.synthetic.textured_prob = 0.5
  c.data.records = ml_collections.ConfigDict()
  c.data.records.counting = ""  # ArrayRecord glob of counting pairs (data.prepare output)
  c.data.records.general = ""   # ArrayRecord glob of general pairs
  c.data.tfds = ml_collections.ConfigDict()
  c.data.tfds.name = ""         # a tfds image-text dataset for the general pairs (data_source)
  c.data.tfds.split = "train"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 256     # global batch (all hosts), counting + general examples
  c.train.lr = 1e-5            # peak learning rate (AdamW)
  c.train.warmup_steps = 100
  c.train.end_lr_fraction = 0.0  # cosine decays to lr * this
  c.train.weight_decay = 0.2   # CLIP's; never applied to norms, biases, embeddings, logit scale
  c.train.b1 = 0.9
  c.train.b2 = 0.98            # CLIP's Adam beta2
  c.train.eps = 1e-6
  c.train.grad_clip = 1.0      # global-norm clipping; 0 disables
  c.train.grad_accum = 1       # micro-batches per update (batch_size must divide by it)
  c.train.freeze = ""          # regex of param paths (a/b/c) kept frozen, e.g. "^vision_model/"
  c.train.seed = 0
  c.train.max_nonfinite = 10   # consecutive non-finite losses before the run stops
  c.train.log_every = 10
  # Persistent XLA compilation cache (a restart or another host skips compiling): a local or
  # gs:// directory; "auto" = ~/.cache/countclip_jax/xla on TPU and GPU, off on CPU; "" = off.
  c.train.compilation_cache = "auto"

  # A profiler trace of steps start_step .. start_step + steps - 1 into WORKDIR/profile, for
  # TensorBoard's profile plugin (`tensorboard --logdir WORKDIR`); 0 = no trace.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 0
  c.profile.steps = 5

  c.count = ml_collections.ConfigDict()
  c.count.lam = 1.0            # λ in L = L_clip + λ L_count (the paper's is 1)
  c.count.fraction = 0.25      # p: share of each batch that are counting pairs
  c.count.num_counterfactuals = 1  # K: 1 = the paper (one wrong number); 8 = all wrong numbers
  # s in L_count: a float (1.0 = the paper's raw cosine) or "learned" (the model's logit scale).
  c.count.scale = ml_collections.FieldReference(1.0, field_type=object)

  # task = "density": CLIP-Count's density counting (data/density_pipeline.py, models/density.py).
  c.density = ml_collections.ConfigDict()
  c.density.source = "synthetic"  # synthetic (data/dense_synthetic.py) | fsc147 | carpk |
                                  # shanghaitech_a | shanghaitech_b
  c.density.data_dir = ""      # root of a real set, in its published layout (counting_datasets)
  c.density.crop_size = 384    # real sets: resized to this height, random square crop of this
                               # side (CLIP-Count); the synthetic world is not cropped
  # Gaussian sigma of the target maps in pixels (CLIP-Count's is 1), or "adaptive" (MCNN's).
  c.density.sigma = ml_collections.FieldReference(1.0, field_type=object)
  c.density.scale = 60.0       # targets are density x this (CLIP-Count's x60); count = sum / scale
  c.density.other_prompts = -1  # E prompts of other kinds per image (-1: 2 synthetic, 0 real)
  c.density.prompt_template = "{}"  # formatted with the class name (CLIP-Count: the bare name)
  c.density.model = "tiny"     # models.density.PRESETS key: clip_count (B/16) | demo | tiny
  c.density.pooling = "eot"    # eot (the true end-of-text) | clip_count (its argmax of the ids
                               # before the context tokens: two tokens early, for ablations)
  c.density.pixel_width = -1  # the decoder's pixel pathway width (ours; 0 off, -1 the preset's)
  c.density.cross_attention = "tokens"  # tokens (the prompt's token states) | pooled (one key,
                                        # CLIP-Count's: every attention weight is 1)
  c.density.contrastive_weight = 0.0  # weight of CLIP-Count's patch-text contrastive loss
  c.density.prompt_contrast_weight = 1.0  # weight of the other-prompt (absent / other kind) loss
  c.density.count_weight = 0.0  # weight of each map's squared count error (ours; 0: CLIP-Count)
  c.density.contrastive_only_steps = 0  # first steps trained on the contrastive loss alone
  c.density.eval_size = 300    # held-out synthetic images (real sets: their whole eval split)
  c.density.eval_window_stride = 128  # sliding-window stride (px) over full real eval images
  c.density.synthetic = ml_collections.ConfigDict()
  c.density.synthetic.size = 100_000  # examples in the dense world's train split
  c.density.synthetic.max_count = 50  # most objects of the prompted kind (at least 1)
  c.density.synthetic.minority_prob = 0.5  # chance another kind outnumbers the prompted one
  # Chance that an image's absent-kind prompt names a colour in the image with another shape
  # (else the world's absent kind, which shares a colour with one present about a quarter of
  # the time): the negatives that make shape, not only colour, decide what is counted.
  c.density.synthetic.hard_absent_prob = 0.0
  # What a prompt names: "color_shape" ("red circles") or "color" ("red"; the kinds of a scene
  # then differ in colour): one-token names, where CLIP-Count's pooling loses the name.
  c.density.synthetic.names = "color_shape"
  c.density.synthetic.image_size = 0  # px the world renders at; 0 = the model's image size

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1             # data-parallel axis; -1 = all devices left over
  c.mesh.fsdp = 1              # params and optimizer state sharded over this axis (ZeRO-3)
  c.mesh.model = 1             # tensor parallelism over attention heads / MLP
  # Multislice: how many slices each axis spans (sharding.device_grid); data first, e.g.
  # two v5e-256 slices: mesh.data=2, mesh.fsdp=256, mesh.dcn_data=2.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_model = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0       # 0 = only at the end
  # synthetic | countbench (needs eval.countbench_dir) | tfds:NAME[:SPLIT], a prepared tfds
  # classification set scored zero-shot for retention (tfds:cifar10, tfds:imagenet2012:validation)
  c.eval.datasets = ("synthetic",)
  c.eval.size = 900            # held-out synthetic images
  c.eval.countbench_dir = ""   # the cache written by `python -m countclip_jax.data.countbench`
  c.eval.tfds_data_dir = ""    # where the tfds: sets are prepared (array_record); "" = tfds's
  c.eval.class_names = ""      # file of class names, one per line, for tfds sets whose labels
                               # are ids (imagenet2012's WordNet synsets)
  c.eval.batch_size = 64
  c.lock()  # presets and overrides may set fields, never add them: a typo is an error
  return c
