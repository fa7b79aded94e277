"""The direction store: its format (:mod:`.format`, the bytes and errors every engine shares), the file engine and
the follower each repair instance keeps on it (:mod:`.files`), the etcd engine and its watching follower
(:mod:`.etcd`), and the URL that picks an engine (:mod:`.backends`)."""
