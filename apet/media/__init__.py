"""Reading user media (images; video later) into RGB frames, torch-free."""
