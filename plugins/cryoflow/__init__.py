"""cryoflow: cryo-EM acquisition pipeline (microscope share -> GPFS -> cluster pre-processing)."""
