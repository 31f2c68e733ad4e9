"""cryoflow: cryo-EM data acquisition pipeline (microscope share -> GPFS -> cluster pre-processing)."""
