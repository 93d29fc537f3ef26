"""Stage 6, push (TFX's Pusher): `pusher.push`."""
