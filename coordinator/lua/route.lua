-- route.lua: fan a run of publishes out to subscriber inboxes and acknowledge the request entries,
-- atomically, fenced by the router lease and the routing version.
--
-- KEYS[1]   router lease of the partition (string: owner token)
-- KEYS[2]   routing version (string counter: members and subscriptions)
-- KEYS[3]   nonce marks (hash: peer id -> "<nonce> <entry id>" of its last accepted signed request)
-- KEYS[4]   the request stream the run came from
-- KEYS[5..] target inbox streams
-- ARGV[1]   lease token of the calling router
-- ARGV[2]   routing version the fan-out was computed with
-- ARGV[3]   consumer group of the request stream
-- ARGV[4]   inbox MAXLEN (approximate)
-- ARGV[5]   number of acks A; ARGV[6] number of messages M; ARGV[7] the router's consumer name
-- ARGV[8]   number of nonce marks K (authenticated runs: each sender's last signed entry in the run)
-- then A request entry ids to acknowledge
-- then K pairs (peer id, "<nonce> <entry id>"), stored in KEYS[3] with the fan-out (unless a
--   higher mark is there), so a router taking over knows exactly which nonces were consumed
-- then M sextets (message id, topic, data json, sender, timestamp ms, headers json or '')
-- then pairs (message index 1..M, inbox index 1..) up to the end; inbox i is KEYS[4 + i]
-- Returns {"ok", deliveries} | {"lost"} when the lease is not ours | {"stale", version}
--   | {"foreign"} when another consumer holds pending entries of the request stream: a router
--     deposed while paused read them before its writes were refused; they are older, so the caller
--     must claim and route them first (nothing is written)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'lost'}
end
local version = redis.call('GET', KEYS[2]) or '0'
if version ~= ARGV[2] then
  return {'stale', version}
end
local summary = redis.call('XPENDING', KEYS[4], ARGV[3])
if summary[4] then
  for _, c in ipairs(summary[4]) do
    if c[1] ~= ARGV[7] and tonumber(c[2]) > 0 then
      return {'foreign'}
    end
  end
end
local maxlen = ARGV[4]
local nacks = tonumber(ARGV[5])
local nmsgs = tonumber(ARGV[6])
local nmarks = tonumber(ARGV[8])
local a = 9
local marks = a + nacks
local msgbase = marks + 2 * nmarks
local p = msgbase + 6 * nmsgs
local n = 0
while p < #ARGV do
  local m = msgbase + 6 * (tonumber(ARGV[p]) - 1)
  if ARGV[m + 5] == '' then
    redis.call('XADD', KEYS[4 + tonumber(ARGV[p + 1])], 'MAXLEN', '~', maxlen, '*',
      'k', 'msg', 'i', ARGV[m], 't', ARGV[m + 1], 'd', ARGV[m + 2], 's', ARGV[m + 3], 'ts', ARGV[m + 4])
  else
    redis.call('XADD', KEYS[4 + tonumber(ARGV[p + 1])], 'MAXLEN', '~', maxlen, '*',
      'k', 'msg', 'i', ARGV[m], 't', ARGV[m + 1], 'd', ARGV[m + 2], 's', ARGV[m + 3], 'ts', ARGV[m + 4],
      'h', ARGV[m + 5])
  end
  n = n + 1
  p = p + 2
end
-- one XACK for the run (ids in chunks that stay well inside Lua's stack for unpack)
for first = a, a + nacks - 1, 1000 do
  redis.call('XACK', KEYS[4], ARGV[3], unpack(ARGV, first, math.min(first + 999, a + nacks - 1)))
end
for i = 0, nmarks - 1 do  -- a mark only ever rises
  local peer, mark = ARGV[marks + 2 * i], ARGV[marks + 2 * i + 1]
  local old = redis.call('HGET', KEYS[3], peer)
  if not old or (tonumber(string.match(old, '^%d+')) or 0) < tonumber(string.match(mark, '^%d+')) then
    redis.call('HSET', KEYS[3], peer, mark)
  end
end
return {'ok', n}
