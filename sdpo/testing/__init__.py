"""Model builders for tests and the benchmark; training never imports this package.

- :mod:`sdpo.testing.configs`: the published SD1.5 / SDXL architectures as explicit configs
  (pure data: UNet, VAE, text encoders, noise schedule, parameter counts);
- :mod:`sdpo.testing.tiny`: tiny random SD1.5 / SDXL pipeline folders with the real layout, built
  offline, so every loading path runs on a CPU with no download;
- :mod:`sdpo.testing.realsize`: random-weight real-size models (meta-device shapes or fast random
  init) standing in for downloaded pipelines.

Dependencies run one way: ``configs`` <- ``tiny`` <- ``realsize``.
"""
