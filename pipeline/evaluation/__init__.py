"""Evaluation: FID and KID with the TF-FID Inception-v3 (inception), statistics (stats), sets (fid)."""
