"""Selection transfer: scout/main overlap, the stage runner (methods from kvpipe.scoring) and its report."""
