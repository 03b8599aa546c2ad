"""Calibration: what the recipes measure on a model, and the profiles that keep it.

ratequant.py   per-layer sensitivities and RateQuant bit allocation
key_scales.py  per-channel key scales for TurboQuant with scaled keys
klt.py         query/key/value second moments and the `klt` method's coordinate bit plans
profile.py     a model's calibration as one versioned artifact: calibrate_profile, save/load_profile
"""
