"""The nuScenes side, shared by every detector: submission format and scoring.

`submission` turns lidar-frame boxes into the official detection submission format;
`scoring` scores submissions with the nuScenes detection metric (mAP, NDS and the TP errors)
and resamples scenes for confidence intervals. nuscenes-devkit is imported only by the
functions that need it (`pip install 'tggbc[eval]'`).
"""
