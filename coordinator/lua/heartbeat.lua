-- heartbeat.lua: stamp a member's last-seen time with Redis server time and return the leader.
--
-- KEYS[1] members zset   KEYS[2] member hash   KEYS[3] leader hash
-- KEYS[4] router lease of the partition (only when ARGV[3] is given)
-- ARGV[1] peer id        ARGV[2] heartbeat payload json, or '' to keep the last one
-- ARGV[3] lease token of the router relaying the heartbeat, or absent / '' (a peer's own call)
-- ARGV[4] the peer's status fields json (StatusField values), or absent / '' to keep the last ones
-- Returns {"ok", now_ms, leader_id, term} | {"evicted", now_ms, leader_id, term} when not a member
--   | {"lost"} when relayed by a router whose lease is gone (nothing written)
if ARGV[3] ~= nil and ARGV[3] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[3] then
  return {'lost'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leader = redis.call('HMGET', KEYS[3], 'id', 'term')
local leader_id = leader[1] or ''
local term = leader[2] or '0'
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then
  return {'evicted', now, leader_id, term}
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'seen', now)
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], 'extra', ARGV[2])
end
if ARGV[4] ~= nil and ARGV[4] ~= '' then
  redis.call('HSET', KEYS[2], 'status', ARGV[4])
end
return {'ok', now, leader_id, term}
