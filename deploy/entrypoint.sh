#!/bin/sh
# The container's start: make the state directory the relay user's, then run the relay as that user.
# Fly, Render and Railway mount a volume owned by root over /data, hiding what the image made there,
# so this cannot be done at build time. Started as any other user, it runs the relay as that user.
set -eu
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$RELAY_STATE_DIR"
    chown -R relay:relay "$RELAY_STATE_DIR"
    exec setpriv --reuid=relay --regid=relay --clear-groups -- "$@"
fi
exec "$@"
