"""Real-size SD1.5 / SDXL architectures written out as explicit configs (pure data).

The configs are the published ``config.json`` files of ``stable-diffusion-v1-5/stable-diffusion-v1-5``
and ``stabilityai/stable-diffusion-xl-base-1.0`` (UNet, VAE, text encoders, DDPM scheduler), copied
field by field so that nothing is downloaded. :mod:`sdpo.testing.realsize` builds random-weight
models from them, :mod:`sdpo.testing.tiny` takes the noise schedule; training loads real weights
through :mod:`sdpo.families`.

Parameter counts (checked by ``tests/test_testing_realsize.py``):

===================  ==============
SD1.5 UNet           859,520,964
SD1.5 / SDXL VAE      83,653,863
CLIP-L text encoder  123,060,480
SDXL UNet          2,567,463,684
OpenCLIP bigG text   694,659,840   (CLIPTextModelWithProjection, 1280-d projection)
===================  ==============
"""

FAMILIES = ("sd15", "sdxl", "sd3", "flux")

SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=[
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)

SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 size ids x 256
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)

_VAE_COMMON = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SD15_VAE = dict(_VAE_COMMON, sample_size=512, scaling_factor=0.18215)
SDXL_VAE = dict(_VAE_COMMON, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# CLIP ViT-L/14 text tower (SD1.5's text encoder and SDXL's first one). eos_token_id = 2 keeps
# transformers' legacy pooling (argmax of the token ids = the end-of-text token).
CLIP_L_TEXT = dict(
    hidden_act="quick_gelu",
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=768,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder, with its 1280-d text projection).
OPENCLIP_BIGG_TEXT = dict(
    CLIP_L_TEXT,
    hidden_act="gelu",
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
)

# The SD1.5 / SDXL training noise schedule (identical for both).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="epsilon",
    steps_offset=1,
)

EXPECTED_PARAMS = {
    "sd15_unet": 859_520_964,
    "sd15_vae": 83_653_863,
    "clip_l_text": 123_060_480,
    "sdxl_unet": 2_567_463_684,
    "sdxl_vae": 83_653_863,
    "openclip_bigg_text": 694_659_840,
}

DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}

# --- Flow-matching transformers (sdpo.families.sd3 / .flux), for the bench's real-size rows ------
# The published configs of stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev
# (transformer, VAE, scheduler) and of their text encoders; T5 is google's T5-v1.1-XXL encoder.

SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L 768 + CLIP-G 1280 projections
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=list(range(13)),  # MMDiT-X: the first 13 blocks
    qk_norm="rms_norm",
)

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2 x 2 packing
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,  # CLIP-L pooled output
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)

_FLOW_VAE_COMMON = dict(
    _VAE_COMMON,
    latent_channels=16,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD3_VAE = dict(_FLOW_VAE_COMMON, scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(_FLOW_VAE_COMMON, scaling_factor=0.3611, shift_factor=0.1159)

# T5-v1.1-XXL encoder (SD3's text_encoder_3, FLUX's text_encoder_2), a T5EncoderModel config.
T5_XXL_ENCODER = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    layer_norm_epsilon=1e-6,
)

# FlowMatchEulerDiscreteScheduler: SD3 shifts its sigmas by 3; FLUX.1-dev shifts at sampling time
# by the image size (the training sigmas are unshifted).
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# Parameter counts of the flow transformers built from these configs (tests/test_flow.py); FLUX.1-dev's
# 11.9 B is its published size.
FLOW_EXPECTED_PARAMS = {
    "sd35m_transformer": 2_243_171_520,
    "flux_dev_transformer": 11_901_408_320,
}
