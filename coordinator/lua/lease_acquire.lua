-- lease_acquire.lua: take a free lease or renew one we hold; never steal a live lease.
--
-- KEYS[1] lease key
-- ARGV[1] holder token   ARGV[2] lease length in ms
-- Returns 1 if the caller holds the lease for ARGV[2] ms from now, else 0
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
