"""The distributed context: which rank this process is and how work units are split."""
