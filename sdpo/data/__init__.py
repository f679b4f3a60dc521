"""Training data: where pairs come from (:mod:`sdpo.data.pickapic`; any layout through
:mod:`sdpo.data.layouts`), how rows become batches
(:mod:`sdpo.data.pairs`: decoding, the one :class:`~sdpo.data.pairs.Augment` object, collation,
the keyed shuffle) and the cached path (:mod:`sdpo.data.cached`). :func:`build_dataloader` is
the one entry point of training for both paths.
"""

from __future__ import annotations

from sdpo.data.pairs import (
    PURPOSE_AUGMENT,
    PURPOSE_NOISE,
    PURPOSE_SHUFFLE,
    Augment,
    keyed_generator,
    keyed_seed,
)
from sdpo.data.pickapic import DataSource

__all__ = [
    "PURPOSE_AUGMENT",
    "PURPOSE_NOISE",
    "PURPOSE_SHUFFLE",
    "Augment",
    "DataSource",
    "build_dataloader",
    "keyed_generator",
    "keyed_seed",
]


def build_dataloader(
    source: DataSource,
    augment: Augment,
    *,
    paired: bool,
    batch_size: int,
    num_workers: int,
    precomputed: tuple | None = None,
):
    """``(loader, dataset, sampler, info)``: batches of decoded images of ``source``, or, with
    ``precomputed = (cache folder, model family)``, of that cache (which the caller has checked
    with :func:`sdpo.data.cached.check_cache`). ``info`` counts rows, ties and pairs.

    Only the ``train`` split is shuffled, as in the official code; other splits keep their order.
    """
    shuffle = source.split == "train"
    if precomputed is not None:
        from sdpo.data.cached import build_cached_loader

        cache_dir, family = precomputed
        return build_cached_loader(
            cache_dir,
            augment,
            family=family,
            paired=paired,
            batch_size=batch_size,
            num_workers=num_workers,
            shuffle=shuffle,
        )
    from sdpo.data.pairs import PreferencePairs, RewardChooser, collate_pairs, make_loader
    from sdpo.data.pickapic import load_pairs

    hf_ds, info = load_pairs(source, augment.seed, paired=paired)
    chooser = RewardChooser(source.choice_model) if source.choice_model else None
    dataset = PreferencePairs(hf_ds, augment, paired=paired, chooser=chooser)
    loader, sampler = make_loader(
        dataset,
        seed=augment.seed,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_pairs,
        shuffle=shuffle,
    )
    return loader, dataset, sampler, info
