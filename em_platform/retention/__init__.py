"""What grows is kept for a stated time, then let go: the policy (:mod:`.policy`)."""
