"""After the copy: tagging verified data for TSM HSM tape migration, and freeing the share."""
