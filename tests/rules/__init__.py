"""Rule tests: each first-party rule through smtpgate.testing, without a gate process."""
