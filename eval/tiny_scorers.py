"""Tiny random weights for the five scorers, loadable through their real loading path.

``build_tiny_scorers(folder)`` writes, offline and in a few seconds:

* ``pickscore_model/`` (CLIPModel, save_pretrained) + ``clip_processor/`` (CLIPProcessor: 32 px
  image processor, a byte-level CLIP tokenizer from
  :func:`sdpo.testing.tiny.write_char_tokenizer`);
* ``sdpo-tiny-openclip.json``: an open_clip model config (registered by ``SDPO_OPENCLIP_ARCH``;
  uses open_clip's own CLIP BPE tokenizer, which ships with open_clip) with
  ``HPS_v2_compressed.pt`` (``{"state_dict": ...}`` as HPS releases it) and
  ``open_clip_pytorch_model.bin`` (a plain state dict, as on the laion hub repo);
* ``aesthetics_clip/`` (CLIP with ``projection_dim`` 768 so that the real 768-1024-128-64-16-1
  MLP shape is kept) + ``aesthetics_mlp.pth``;
* ``ImageReward.pt`` (package key layout, tiny BLIP ViT: 224 px, patch 16, width 64, 2 blocks;
  BERT hidden 768 because the package's MLP input is fixed at 768), ``med_config.json`` and
  ``bert_tokenizer/`` (a WordPiece vocab of characters written here).

It returns the environment variables of :mod:`eval.scorers` pointing at them. From a test::

    from eval.tiny_scorers import build_tiny_scorers
    env = build_tiny_scorers(tmp_path / "scorers")
    for k, v in env.items():
        monkeypatch.setenv(k, v)        # or os.environ.update(env) in a subprocess's env
    get_scorer("hpsv2").score(images, prompts)   # any of the five, offline

From a shell: ``eval "$(python -m eval.tiny_scorers DIR)"`` exports them. A finished folder is
reused (its ``env.json`` is written last).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpo import io as sdpo_io
from sdpo.cli import arg, parse

TINY_OPENCLIP_NAME = "sdpo-tiny-openclip"
TINY_OPENCLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# BLIP ViT of the tiny ImageReward checkpoint (the scorer infers it back from the weights).
TINY_BLIP_GEOMETRY = dict(image_size=224, patch_size=16, width=64, depth=2, proj_dim=256)
CHAR_BOS, CHAR_EOS = 512, 513  # ids of <|startoftext|> / <|endoftext|> in write_char_tokenizer


def _tiny_clip_config(projection_dim: int):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=CHAR_BOS,
        eos_token_id=CHAR_EOS,
        pad_token_id=CHAR_EOS,
        projection_dim=projection_dim,
    )
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=projection_dim,
    )
    # (sub-configs carry projection_dim too, as in the released CLIP configs)
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim
    )


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def write_bert_tokenizer(path: Path) -> Path:
    """A lower-case WordPiece vocab of characters (+ ``##`` continuations): any text tokenises."""
    from transformers import BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(path).save_pretrained(path)
    return path


def _tiny_med_config(vocab_size: int) -> dict:
    # BLIP med_config layout (bert-base keys + encoder_width/add_cross_attention), tiny depth.
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": TINY_BLIP_GEOMETRY["width"],
        "add_cross_attention": True,
    }


def _randomise_(module: torch.nn.Module, generator: torch.Generator, std: float = 0.2) -> None:
    """Spread every parameter so that tiny random scorers give clearly different scores."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)


def build_tiny_scorers(path: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Write tiny random weights for all five scorers into ``path``; return their env vars."""
    path = Path(path)
    done = path / "env.json"
    if done.is_file():
        return json.loads(done.read_text())
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    from sdpo.testing.tiny import write_char_tokenizer

    # PickScore: CLIP model folder + processor folder (as the two hub repos).
    tok_dir = write_char_tokenizer(path / "clip_processor")
    processor = CLIPProcessor(
        image_processor=_image_processor(), tokenizer=CLIPTokenizer.from_pretrained(tok_dir)
    )
    processor.save_pretrained(path / "clip_processor")
    pick = CLIPModel(_tiny_clip_config(projection_dim=16))
    _randomise_(pick, gen)
    pick.save_pretrained(path / "pickscore_model")

    # Aesthetics: CLIP (768-d projection) with its image processor, and the MLP file.
    from eval.scorers import AestheticMLP

    aes_clip = CLIPModel(_tiny_clip_config(projection_dim=768))
    _randomise_(aes_clip, gen)
    aes_clip.save_pretrained(path / "aesthetics_clip")
    _image_processor().save_pretrained(path / "aesthetics_clip")
    mlp = AestheticMLP(768)
    _randomise_(mlp, gen, std=0.05)
    torch.save(mlp.state_dict(), path / "aesthetics_mlp.pth")

    # open_clip: tiny registered architecture; HPS checkpoint and plain CLIP weights.
    import open_clip

    arch_json = path / f"{TINY_OPENCLIP_NAME}.json"
    arch_json.write_text(json.dumps(TINY_OPENCLIP_CONFIG))
    open_clip.add_model_config(arch_json)
    hps = open_clip.create_model(TINY_OPENCLIP_NAME, pretrained=None)
    _randomise_(hps, gen, std=0.05)
    torch.save({"state_dict": hps.state_dict()}, path / "HPS_v2_compressed.pt")
    plain = open_clip.create_model(TINY_OPENCLIP_NAME, pretrained=None)
    _randomise_(plain, gen, std=0.05)
    torch.save(plain.state_dict(), path / "open_clip_pytorch_model.bin")

    # ImageReward: tokenizer, med_config, checkpoint with the package's key layout.
    from eval.compat import import_imagereward_blip
    from eval.scorers import build_imagereward_net

    import_imagereward_blip()
    from ImageReward.models.BLIP.med import BertConfig

    bert_dir = write_bert_tokenizer(path / "bert_tokenizer")
    from transformers import BertTokenizer

    vocab_size = len(BertTokenizer.from_pretrained(bert_dir)) + 2  # + [DEC], [ENC] as in BLIP
    med_config = path / "med_config.json"
    med_config.write_text(json.dumps(_tiny_med_config(vocab_size), indent=1))
    net = build_imagereward_net(BertConfig.from_json_file(str(med_config)), TINY_BLIP_GEOMETRY)
    _randomise_(net, gen, std=0.02)
    _randomise_(net.mlp, gen, std=0.05)  # so that tiny ImageReward scores visibly differ
    torch.save(net.state_dict(), path / "ImageReward.pt")

    env = {
        "SDPO_PICKSCORE_MODEL": str(path / "pickscore_model"),
        "SDPO_PICKSCORE_PROCESSOR": str(path / "clip_processor"),
        "SDPO_OPENCLIP_ARCH": str(arch_json),
        "SDPO_HPSV2_CHECKPOINT": str(path / "HPS_v2_compressed.pt"),
        "SDPO_CLIP_CHECKPOINT": str(path / "open_clip_pytorch_model.bin"),
        "SDPO_AESTHETICS_CLIP": str(path / "aesthetics_clip"),
        "SDPO_AESTHETICS_MLP": str(path / "aesthetics_mlp.pth"),
        "SDPO_IMAGEREWARD_CHECKPOINT": str(path / "ImageReward.pt"),
        "SDPO_IMAGEREWARD_MED_CONFIG": str(med_config),
        "SDPO_BERT_TOKENIZER": str(bert_dir),
    }
    sdpo_io.write_json(done, env)
    return env


@dataclass
class TinyScorersConfig:
    """Options of ``python -m eval.tiny_scorers``."""

    path: str = arg(cli=False, help="folder to write the tiny scorer weights into")
    seed: int = arg(0, "seed of the random weights")


def _positional_path(parser) -> None:
    parser.add_argument("path", help="folder to write the tiny scorer weights into")


def parse_args(argv=None) -> TinyScorersConfig:
    return parse(
        TinyScorersConfig,
        argv,
        prog="python -m eval.tiny_scorers",
        description=__doc__.split("\n")[0],
        extend=_positional_path,  # a positional: the namespace fills the cli=False field
    )


def main(argv=None) -> None:
    cfg = parse_args(argv)
    for key, value in build_tiny_scorers(cfg.path, seed=cfg.seed).items():
        print(f"export {key}='{value}'")


if __name__ == "__main__":
    main()
