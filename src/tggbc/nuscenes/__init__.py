"""The nuScenes side, shared by every detector: reading, submission format, scoring, evaluation.

`reader` produces the published configs' original test-time inputs from a nuScenes dataroot
(nuscenes-devkit); `submission` turns lidar-frame boxes into the official detection submission
format; `scoring` scores submissions with the nuScenes detection metric (mAP, NDS and the TP
errors) and resamples scenes for confidence intervals; `published` runs and scores the published
detectors (`tggbc eval --model`), split over processes by `distributed` under torchrun.
nuscenes-devkit is imported only by the functions that need it (`pip install 'tggbc[eval]'`).
"""
