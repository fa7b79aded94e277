"""A served model repository: its layout (:mod:`.layout`, shared with the stages and the launcher, which only read
it) and the builder that writes one (:mod:`.build`, ``fire repo build``), which imports no stub code."""
