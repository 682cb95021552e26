"""methods/blocks"""
