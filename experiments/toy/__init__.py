"""CPU toy reproduction of the paper's pathology and of the safeguard's fix.

Paper (arXiv 2511.03317): Diffusion-DPO enlarges the preference margin while the noise-prediction
error of BOTH the winner and the loser rises relative to the reference model; the SDPO
winner-preserving safeguard keeps the winner's error from rising while the margin still grows.

This package makes everything needed to see it in a few minutes on a CPU, with no download:

1. :mod:`~experiments.toy.task`: a synthetic text-to-image preference task: coloured shapes on
   coloured backgrounds, captioned "a red circle on a blue background"; in each pair the winner
   is the clean picture and the loser the same picture made worse (noisy or blurry by default; a
   wrong colour or shape with ``--loser_kinds``). Written in the Pick-a-Pic parquet schema
   (``jpg_0``, ``jpg_1``, ``label_0``, ``caption``) so the trainer reads it with
   ``--train_data_dir``; held-out pairs are written separately;
2. :mod:`~experiments.toy.model`: a tiny SD1.5-style model
   (:func:`sdpo.testing.tiny.build_tiny_sd15`, with a deterministic VAE and a smaller UNet);
3. :mod:`~experiments.toy.runs`: a short SFT phase (``--train_method sft``) so the start already
   denoises and the reference is meaningful, then Diffusion-DPO, DSPO and DMPO, safeguard off /
   on, several seeds, all through the training loop (:func:`sdpo.training.main`, what
   ``train.py`` runs) from the same SFT start; on held-out pairs at FIXED noise and timesteps:
   winner / loser error of the policy minus the reference, the margin and implicit accuracy
   (with :mod:`sdpo.losses`), and λ (from ``train_log.jsonl``, and on held-out with
   :func:`sdpo.safeguard.winner_preserving_scale`);
4. :mod:`~experiments.toy.report`: ``curves.json``, PNG plots and ``summary.md``.

Settings: :mod:`~experiments.toy.config`; the whole demo: :func:`experiments.toy.__main__.main`.

Run: ``python -m experiments.toy [--outdir runs/toy] [--seeds 3] [--steps N] [--quick]``.
"""
