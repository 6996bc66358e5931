"""merging: W0 + scaling · B·A in row blocks"""
