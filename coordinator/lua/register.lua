-- register.lua: make a peer a member (or refresh it), reply with the leader, ack the request entry,
-- and announce a join on the system stream exactly once per join.
--
-- KEYS[1] router lease   KEYS[2] members zset   KEYS[3] member hash   KEYS[4] request stream
-- KEYS[5] peer's inbox   KEYS[6] leader hash    KEYS[7] system stream KEYS[8] events stream
-- KEYS[9] routing version (bumped when the member set changes)
-- KEYS[10] electorate zset (id -> -priority, eligible members only)
-- ARGV[1] lease token, or '' when called outside a router (no fencing, no ack, no reply)
-- ARGV[2] consumer group ARGV[3] request entry id, or ''  ARGV[4] peer id
-- ARGV[5] request id, or ''    ARGV[6] inbox MAXLEN   ARGV[7] member info json (role, labels, ...)
-- ARGV[8] leader eligible ('1' | '0')   ARGV[9] priority
-- ARGV[10..] member hash field/value pairs
-- Returns {"ok", joined(0|1), leader_id, term, routing version} | {"lost"}
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'lost'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local joined = 0
local version
if redis.call('ZSCORE', KEYS[2], ARGV[4]) == false then
  joined = 1
  redis.call('HSET', KEYS[3], 'joined', now)
  version = redis.call('INCR', KEYS[9])
else
  version = tonumber(redis.call('GET', KEYS[9]) or '0')
end
redis.call('ZADD', KEYS[2], now, ARGV[4])
if ARGV[8] == '1' then
  redis.call('ZADD', KEYS[10], -tonumber(ARGV[9]), ARGV[4])
else
  redis.call('ZREM', KEYS[10], ARGV[4])
end
for i = 10, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[3], 'seen', now)
local leader = redis.call('HMGET', KEYS[6], 'id', 'term')
local leader_id = leader[1] or ''
local term = leader[2] or '0'
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'k', 'reply', 'r', ARGV[5], 'ok', '1',
    'leader', leader_id, 'term', term)
end
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[4], ARGV[2], ARGV[3])
end
if joined == 1 then
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', '100000', '*', 'k', 'pub', 't', 'cluster.member.joined',
    'd', ARGV[7], 's', 'sidecar')
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', '10000', '*', 'event', 'joined', 'peer', ARGV[4])
end
return {'ok', joined, leader_id, term, version}
