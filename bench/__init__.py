"""`make bench`: deepserve against the servers a user could run instead (see __main__)."""
