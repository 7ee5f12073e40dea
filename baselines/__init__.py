"""Baselines that DB3KD is compared with (REFERENCE.md section 5). Importing this package registers them.

=================  ==========  ===========================================================
method             access      module
=================  ==========  ===========================================================
teacher-ce         white_box   :mod:`baselines.reference` (reference row: the shared teacher itself)
teacher-arch-ce    none        :mod:`baselines.reference` (reference row: teacher architecture, student recipe)
student-ce         none        :mod:`baselines.reference` (reference row)
standard-kd        scores      :mod:`baselines.kd`
surrogate-kd       none        :mod:`baselines.kd`
noise-logits       none        :mod:`baselines.kd`
hard-label-kd      labels      :mod:`baselines.kd`
label-smoothing    none        :mod:`baselines.label_smoothing`
ban                none        :mod:`baselines.ban`
tf-kd-self         none        :mod:`baselines.tf_kd`
tf-kd-reg          none        :mod:`baselines.tf_kd`
sskd               none        :mod:`baselines.sskd`
noise-input        labels      :mod:`baselines.zero_shot`
zskt               white_box   :mod:`baselines.zskt`
fs-bbt             scores      :mod:`baselines.fs_bbt`
fs-bbt-labels      labels      :mod:`baselines.fs_bbt`
=================  ==========  ===========================================================

Shared machinery: :mod:`baselines.common` (CE training, Hinton KD from cached or white-box
targets) and :mod:`baselines.features` (penultimate features of any registry model).
"""

from baselines import ban, fs_bbt, kd, label_smoothing, reference, sskd, tf_kd, zero_shot, zskt  # noqa: F401  (each registers its methods)
