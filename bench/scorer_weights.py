"""Random-weight REAL-SIZE scorer backbones, written where :mod:`eval.scorers` loads them from.

The benchmark times scoring (images/s per metric) through the evaluation's own loading and
scoring code (:func:`eval.scorers.get_scorer`), so each scorer's weights must exist as files.
Nothing may be downloaded, so this writes random weights of the published architectures, in the
layout :mod:`eval.tiny_scorers` uses for its tiny ones, and returns the environment variables of
:mod:`eval.scorers` that point at them:

==============  ===========================================================================
pickscore       transformers ``CLIPModel`` of CLIP ViT-H/14 (vision 1280-d x 32 layers, patch
                14, 224 px; text 1024-d x 24 layers; projection 1024), a 224 px processor
hpsv2, clip     open_clip's registered ``ViT-H-14`` (random init), as an HPS checkpoint
                (``{"state_dict": ...}``) and a plain state dict
aesthetics      CLIP ViT-L/14 (1024-d x 24 layers, projection 768) + the 768-1024-128-64-16-1 MLP
imagereward     BLIP ViT-L/16 (1024-d x 24 blocks, 224 px) + BERT-base (12 x 768, cross-attention)
==============  ===========================================================================

Tokenizers are the character-level ones of the tiny scorers (real tokenizers are vocabulary
files that cannot be downloaded; their cost is negligible next to the backbones). Throughput
does not depend on the weights' values. Models are initialised on ``device`` (fast on a GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_VIT_H14 = dict(
    vision=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16
    ),
    text=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
    ),
    projection_dim=1024,
)
CLIP_VIT_L14 = dict(
    vision=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16
    ),
    text=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
    projection_dim=768,
)
BLIP_VIT_L16 = dict(image_size=224, patch_size=16, width=1024, depth=24, proj_dim=256)
# BLIP's med_config: BERT-base with cross-attention to the ViT (vocabulary: bert-base-uncased's
# 30,522 + [DEC] and [ENC]).
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": BLIP_VIT_L16["width"],
    "add_cross_attention": True,
}


def _clip_config(arch: dict):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    from eval.tiny_scorers import CHAR_BOS, CHAR_EOS

    text = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=CHAR_BOS,
        eos_token_id=CHAR_EOS,
        pad_token_id=CHAR_EOS,
        projection_dim=arch["projection_dim"],
        hidden_act="gelu",
        **arch["text"],
    )
    vision = CLIPVisionConfig(
        image_size=224,
        patch_size=14,
        projection_dim=arch["projection_dim"],
        hidden_act="gelu",
        **arch["vision"],
    )
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=arch["projection_dim"],
    )


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def _save_hf(model, path: Path) -> None:
    model.to("cpu").save_pretrained(path, safe_serialization=True)


def build_scorer_weights(name: str, path: str | Path, *, device="cpu") -> dict[str, str]:
    """Write real-size random weights of scorer ``name`` under ``path``; return its env vars."""
    from sdpo import io

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        if name == "pickscore":
            from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

            from sdpo.testing.tiny import write_char_tokenizer

            tok = write_char_tokenizer(path / "clip_processor")
            CLIPProcessor(
                image_processor=_image_processor(), tokenizer=CLIPTokenizer.from_pretrained(tok)
            ).save_pretrained(path / "clip_processor")
            _save_hf(CLIPModel(_clip_config(CLIP_VIT_H14)), path / "pickscore_model")
            return {
                "SDPO_PICKSCORE_MODEL": str(path / "pickscore_model"),
                "SDPO_PICKSCORE_PROCESSOR": str(path / "clip_processor"),
            }
        if name in ("hpsv2", "clip"):
            import open_clip

            model = open_clip.create_model("ViT-H-14", pretrained=None, device=device)
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            if name == "hpsv2":
                io.save_torch({"state_dict": state}, path / "HPS_v2_compressed.pt")
                return {
                    "SDPO_OPENCLIP_ARCH": "ViT-H-14",
                    "SDPO_HPSV2_CHECKPOINT": str(path / "HPS_v2_compressed.pt"),
                }
            io.save_torch(state, path / "open_clip_pytorch_model.bin")
            return {
                "SDPO_OPENCLIP_ARCH": "ViT-H-14",
                "SDPO_CLIP_CHECKPOINT": str(path / "open_clip_pytorch_model.bin"),
            }
        if name == "aesthetics":
            from transformers import CLIPModel

            from eval.scorers import AestheticMLP

            _save_hf(CLIPModel(_clip_config(CLIP_VIT_L14)), path / "aesthetics_clip")
            _image_processor().save_pretrained(path / "aesthetics_clip")
            mlp = AestheticMLP(768)
            io.save_torch({k: v.cpu() for k, v in mlp.state_dict().items()}, path / "mlp.pth")
            return {
                "SDPO_AESTHETICS_CLIP": str(path / "aesthetics_clip"),
                "SDPO_AESTHETICS_MLP": str(path / "mlp.pth"),
            }
        if name == "imagereward":
            from eval.compat import import_imagereward_blip
            from eval.scorers import build_imagereward_net
            from eval.tiny_scorers import write_bert_tokenizer

            import_imagereward_blip()
            from ImageReward.models.BLIP.med import BertConfig

            bert = write_bert_tokenizer(path / "bert_tokenizer")
            io.write_json(path / "med_config.json", MED_CONFIG)
            config = BertConfig.from_json_file(str(path / "med_config.json"))
            net = build_imagereward_net(config, BLIP_VIT_L16)
            state = {k: v.cpu() for k, v in net.state_dict().items()}
            io.save_torch(state, path / "ImageReward.pt")
            return {
                "SDPO_IMAGEREWARD_CHECKPOINT": str(path / "ImageReward.pt"),
                "SDPO_IMAGEREWARD_MED_CONFIG": str(path / "med_config.json"),
                "SDPO_BERT_TOKENIZER": str(bert),
            }
    raise ValueError(f"no real-size weights for scorer {name!r}")
