-- reply.lua: the router's answer to one request that no other script answers (a rejection, a
-- heartbeat or leave reply, a subscriber's dl request giving a delivery up): optionally write a
-- dead-letter entry, optionally reply to its sender, and
-- acknowledge it, atomically and fenced by the router lease, so a router deposed while paused
-- never answers or dead-letters a request its successor handles too.
--
-- KEYS[1] router lease of the partition   KEYS[2] request stream
-- KEYS[3] sender's inbox (any key when no reply)   KEYS[4] dead-letter stream (any key when none)
-- ARGV[1] lease token   ARGV[2] consumer group   ARGV[3] request entry id to ack, or ''
-- ARGV[4] inbox MAXLEN  ARGV[5] dead-letter MAXLEN
-- ARGV[6] R: field/value pairs of the reply (0: no reply)
-- ARGV[7] D: field/value pairs of the dead-letter entry (0: none)
-- then R pairs, then D pairs
-- Returns 1 | 0 when the lease is not ours (nothing written)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local r = tonumber(ARGV[6])
local d = tonumber(ARGV[7])
if d > 0 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 8 + 2 * r, 7 + 2 * r + 2 * d))
end
if r > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 8, 7 + 2 * r))
end
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
end
return 1
